"""Loaded by every Python process of the vLLM server spogw starts (its directory is put on PYTHONPATH there).

It installs :mod:`spogw_lora_cpu`'s LoRA operators into vLLM's CPU punica wrapper when vLLM's torch LoRA ops
module is imported. Nothing else is touched; any other interpreter never has this directory on its path.
"""

try:
    import spogw_lora_cpu

    spogw_lora_cpu.install()
except Exception as exc:  # never stop the server: vLLM's own operators stay in place
    import sys

    print(f"spogw: the faster CPU LoRA operators were not installed ({type(exc).__name__}: {exc})", file=sys.stderr)
