"""The CPU server's LoRA operators (spogw/engine/vllm_site): the same values as vLLM's per-token ones, installed
into every process of the server spogw starts, and only there."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from spogw.engine.options import EngineOptions
from spogw.engine.server import VLLM_SITE

sys.path.insert(0, str(VLLM_SITE))
import spogw_lora_cpu as ours  # noqa: E402


def per_token(inputs, weights, indices, dtype):
    """vLLM's reading: each token's own copy of its slot's matrix (``weights[indices]``), contracted."""
    selected = weights[indices].to(dtype=dtype)
    if selected.dim() == 4:
        selected = selected.squeeze(1)
    return torch.einsum("bi, boi -> bo", inputs.to(dtype=dtype), selected)


@pytest.mark.parametrize("slots,tokens,hidden,rank", [(1, 7, 64, 8), (2, 33, 48, 16), (3, 1, 32, 4)])
def test_the_operators_compute_what_the_per_token_ones_compute(slots, tokens, hidden, rank):
    g = torch.Generator().manual_seed(slots * 100 + tokens)
    x = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16)
    a = torch.randn(slots, 1, rank, hidden, generator=g).to(torch.bfloat16)  # 4-d, as vLLM stacks them
    b = torch.randn(slots, hidden, rank, generator=g).to(torch.bfloat16)
    idx = torch.randint(-1, slots, (tokens,), generator=g)  # -1: no adapter (Python indexing, as vLLM's)
    y = torch.zeros(tokens, rank)
    ours.bgmv_shrink(x, a, y, idx, 0.5)
    torch.testing.assert_close(y, 0.5 * per_token(x, a, idx, torch.float32), rtol=1e-5, atol=1e-5)
    z = torch.randn(tokens, rank, generator=g)
    for add in (True, False):
        out = torch.randn(tokens, hidden + 3, generator=g).to(torch.bfloat16)  # padded wider than the adapter
        want = out.clone()
        want[:, :hidden] = (want[:, :hidden] if add else 0) + per_token(z, b, idx, torch.bfloat16)
        ours.bgmv_expand(z, b, out, idx, add)
        torch.testing.assert_close(out, want)
        out = torch.randn(tokens, 3 * hidden, generator=g).to(torch.bfloat16)
        want = out.clone()
        want[:, hidden:2 * hidden] = (want[:, hidden:2 * hidden] if add else 0) + per_token(z, b, idx, torch.bfloat16)
        ours.bgmv_expand_slice(z, b, out, idx, hidden, hidden, add)
        torch.testing.assert_close(out, want)


def test_the_cpu_server_gets_them_and_nothing_else_does(tmp_path):
    from spogw.engine.server import EngineServer

    env = EngineServer(EngineOptions(), "embedded", tmp_path)._env()
    assert env["PYTHONPATH"].split(":")[0] == str(VLLM_SITE)
    assert list(VLLM_SITE.iterdir()) and sorted(p.name for p in VLLM_SITE.glob("*.py")) == [
        "sitecustomize.py", "spogw_lora_cpu.py"]  # what that directory puts on the server's path: these two only


def _vllm_python():
    from spogw.engine import EngineUnavailable
    from spogw.engine.server import find_python

    try:
        python = find_python(EngineOptions())
    except EngineUnavailable:
        return None
    return python if subprocess.run([python, "-c", "import vllm"], capture_output=True).returncode == 0 else None


PROBE = """
import torch
import vllm.lora.ops.torch_ops as ops
import vllm.lora.punica_wrapper.punica_cpu as cpu
import vllm.lora.ops.torch_ops.lora_ops as lora_ops
names = {cpu.bgmv_shrink.__module__, ops.bgmv_expand.__module__, lora_ops.bgmv_expand_slice.__module__}
assert names == {"spogw_lora_cpu"}, names
# vLLM's own sgmv (prefill) path now runs ours and still computes vLLM's values
x, w = torch.randn(6, 32), torch.randn(1, 1, 4, 32)
y = torch.zeros(6, 4)
ops.sgmv_shrink(x, w, y, torch.tensor([0]), torch.tensor([6]), torch.tensor([0]), 1, 6, 6, 1.0)
torch.testing.assert_close(y, x @ w[0, 0].t())
print("ok")
"""


def test_inside_vllm_the_operators_are_replaced_before_anyone_imports_them():
    python = _vllm_python()
    if python is None:
        pytest.skip("no interpreter with vLLM (`make engine` builds .venv-vllm on Linux x86-64)")
    out = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(VLLM_SITE), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
