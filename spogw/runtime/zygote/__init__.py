"""The sandbox's trusted half, run as its own process: ``python -I spogw/runtime/zygote serve|once '<options>'``.

Files, one concern each (all import only the standard library, so the zygote starts fast and its children import
nothing of the project's):

    __main__.py   start-up and the control loop with the parent (frames on a unix socket, fds by SCM_RIGHTS)
    zygote.py     set-up shared by a pool worker's tasks: uids, cgroups, namespaces, the template, the probe
    task.py       one task: its children spawned through the template, supervised, classified
    template.py   the pristine forker: every child is forked from a process that never held any task's data
    rootfs.py     the children's filesystem: a minimal read-only root (pivot_root), fresh /tmp and /proc per child
    child.py      one child from fork to exit: isolation (rlimits, uid, seccomp, ...), then its role
    linux.py      the kernel primitives (ctypes): namespaces, mounts, prctl, seccomp BPF, capabilities, rlimits
    check.py      the check protocol: the solution and its tests in two processes, the verdict on a channel of its own
    plain.py      the trusted codec of plain values, the only thing that crosses from a solution to its tests
    outcome.py    wait statuses and channels -> status and reason; the tests' verdict
    rpc.py        run_entry's child side (``function(payload, rpc)``, JSON frames over two pipes)
    wire.py       frames over pipes and sockets

The parent's side is ``spogw.runtime.sandbox``; the design and its figures are in notes/sandbox.md.
"""
