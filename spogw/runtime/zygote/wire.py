"""Frames: a 4-byte big-endian length, then UTF-8 JSON. Over pipes (run_entry's RPC) and over unix stream sockets,
where a frame may carry file descriptors (SCM_RIGHTS): parent -> zygote (run_entry's RPC pipes) and zygote <->
template (every child's pipes, its payload memfd, its pidfd)."""

from __future__ import annotations

import json
import os
import socket
import struct

MAX_CONTROL_FRAME = 256 << 20
MAX_FDS = 16


def read_exact(fd: int, n: int) -> bytes:
    """Read exactly n bytes from fd, or raise EOFError (peer gone)."""
    chunks = []
    while n:
        b = os.read(fd, min(n, 1 << 20))
        if not b:
            raise EOFError("pipe closed")
        chunks.append(b)
        n -= len(b)
    return b"".join(chunks)


def read_frame(fd: int, cap: int = MAX_CONTROL_FRAME) -> dict:
    (n,) = struct.unpack(">I", read_exact(fd, 4))
    if n > cap:
        raise ValueError(f"frame of {n} bytes exceeds the cap of {cap}")
    return json.loads(read_exact(fd, n))


def write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


def write_frame(fd: int, obj) -> None:
    data = json.dumps(obj).encode()
    write_all(fd, struct.pack(">I", len(data)) + data)


def send(sock: socket.socket, obj, fds=()) -> None:
    """One frame on a unix stream socket; ``fds`` ride on its first byte."""
    data = json.dumps(obj).encode()
    data = struct.pack(">I", len(data)) + data
    if fds:
        sent = socket.send_fds(sock, [data], list(fds))
        data = data[sent:]
    sock.sendall(data)


def recv(sock: socket.socket, cap: int = MAX_CONTROL_FRAME) -> tuple[dict, list[int]]:
    """The next frame and the fds that came with it. EOFError when the peer is gone."""
    head, fds = b"", []
    while len(head) < 4:
        data, got, _flags, _addr = socket.recv_fds(sock, 4 - len(head), MAX_FDS)
        fds += got
        if not data:
            for fd in fds:
                os.close(fd)
            raise EOFError("control socket closed")
        head += data
    (n,) = struct.unpack(">I", head)
    if n > cap:
        raise ValueError(f"frame of {n} bytes exceeds the cap of {cap}")
    buf = bytearray(n)
    view, got_n = memoryview(buf), 0
    while got_n < n:
        k = sock.recv_into(view[got_n:], n - got_n)
        if not k:
            raise EOFError("control socket closed mid-frame")
        got_n += k
    return json.loads(buf), fds
