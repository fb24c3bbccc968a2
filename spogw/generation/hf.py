"""The transformers generator backend: a causal LM (plus an optional peft LoRA adapter, merged) in this process.

Left-padded batched ``generate`` over the chat template, on CPU or GPU; with ``guide=`` the token-level guided
decoder of :mod:`spogw.workflows.guided_decoding` (one prefill per conversation shared by its ``n`` rows). The
fallback of the engine (:mod:`spogw.engine`) wherever vLLM cannot run.

Seeding: with one ``seed`` every batch reseeds torch with ``seed`` and the batch's position, so a call with the
same prompts, ``n``, batch size and seed returns the same texts. A sampled text depends on its batch mates (the
batch shares one random stream); greedy decoding (``temperature=0``) does not. With one seed per prompt, each
prompt's rows are batched on their own and drawn from that prompt's seed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from spogw.generation.base import GenerationStats, check_sampling


class TransformersGenerator:
    """A transformers causal LM, optionally with a peft LoRA adapter, generating in left-padded batches.

    ``model`` is anything :func:`spogw.models.resolve_model` accepts (``embedded``, a directory, a hub id);
    ``adapter`` a directory written by ``save_pretrained`` of a peft model (``<run_dir>/adapter``). The
    adapter is merged into the weights after loading: generation then costs what the base model costs.
    Prompts longer than ``max_prompt_tokens`` lose their beginning (the question and the request to
    answer sit at the end). The model loads on first use.
    """

    def __init__(self, model: str = "embedded", adapter: str | None = None, *, dtype: str | None = "float32",
                 batch_size: int = 8, max_prompt_tokens: int = 4096, device: str | None = None):
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
        self.model_name, self.adapter, self.dtype = model, adapter, dtype
        self.batch_size, self.max_prompt_tokens, self.device = batch_size, max_prompt_tokens, device
        self.identity = f"transformers:{model}" + (f"+{adapter}" if adapter else "")
        self.stats = GenerationStats()
        self._model = self._tokenizer = None
        self._guides: dict = {}
        self._lock = threading.Lock()

    def _load(self) -> None:
        if self._model is not None:
            return
        from pathlib import Path

        from spogw.models import load_causal_lm, load_tokenizer

        tokenizer = load_tokenizer(self.model_name)
        tokenizer.padding_side = "left"  # generation continues from the right edge of every row
        tokenizer.truncation_side = "left"
        model = load_causal_lm(self.model_name, dtype=self.dtype)
        if self.adapter:
            if not (Path(self.adapter) / "adapter_config.json").is_file():
                raise FileNotFoundError(f"`--adapter {self.adapter}`: no adapter_config.json there (expected the "
                                        "directory a peft model's save_pretrained writes, e.g. <run_dir>/adapter)")
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, self.adapter).merge_and_unload()
        if self.device:
            model.to(self.device)
        model.eval()
        self._tokenizer, self._model = tokenizer, model

    def generate(self, prompts: list[list[dict]], *, n: int = 1, temperature: float = 0.0, top_p: float = 1.0,
                 max_new_tokens: int = 512, seed: int | Sequence[int] = 0, guide: str | None = None,
                 on_batch=None, on_prompt=None) -> list[list[str]]:
        """``n`` completions per conversation (see :class:`spogw.generation.base.Generator`).

        With ``guide`` (a workflow family) the completions are sampled inside that family's workflow grammar
        (:mod:`spogw.workflows.guide`): each conversation is prefilled once and its ``n`` rows (in chunks of
        ``batch_size``) share that prefill."""
        check_sampling(n, temperature, top_p, max_new_tokens)
        if not isinstance(seed, int) and len(seed) != len(prompts):
            raise ValueError(f"`seed` has {len(seed)} values for {len(prompts)} prompts")
        if guide is not None:
            return self._generate_guided(prompts, guide, n, temperature, top_p, max_new_tokens, seed, on_batch,
                                         on_prompt)
        if not isinstance(seed, int):  # per-prompt seeds: each prompt's rows batched on their own
            out = []
            for i, (conversation, own) in enumerate(zip(prompts, seed, strict=True)):
                out += self.generate([conversation], n=n, temperature=temperature, top_p=top_p,
                                     max_new_tokens=max_new_tokens, seed=int(own))
                if on_prompt is not None:
                    on_prompt(i, out[-1])
                if on_batch is not None:
                    on_batch((i + 1) * n, len(prompts) * n)
            return out
        rows = [conv for conv in prompts for _ in range(n)]
        texts: list[str] = []
        reported = 0
        with self._lock:
            self._load()
            for start in range(0, len(rows), self.batch_size):
                texts += self._generate_batch(rows[start:start + self.batch_size], temperature, top_p,
                                              max_new_tokens, seed * 1_000_003 + start)
                if on_batch is not None:
                    on_batch(len(texts), len(rows))
                while on_prompt is not None and (reported + 1) * n <= len(texts):
                    on_prompt(reported, texts[reported * n:(reported + 1) * n])
                    reported += 1
        return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]

    def _generate_guided(self, prompts, family: str, n: int, temperature: float, top_p: float,
                         max_new_tokens: int, seed, on_batch, on_prompt) -> list[list[str]]:
        from spogw.workflows.guide import load_guide
        from spogw.workflows.guided_decoding import TokenGuide, guided_generate

        out: list[list[str]] = []
        with self._lock:
            self._load()
            tok = self._tokenizer
            if family not in self._guides:
                self._guides[family] = TokenGuide(load_guide(family), tok)
            guide = self._guides[family]
            for c, conversation in enumerate(prompts):
                text = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
                ids = tok(text, truncation=True, max_length=self.max_prompt_tokens, add_special_tokens=False)
                texts: list[str] = []
                for start in range(0, n, self.batch_size):
                    t0 = time.perf_counter()
                    rows = min(self.batch_size, n - start)
                    chunk, decoded = guided_generate(self._model, ids["input_ids"], guide, n=rows,
                                                     temperature=temperature, top_p=top_p,
                                                     max_new_tokens=max_new_tokens,
                                                     seed=(seed * 1_000_003 + c * n if isinstance(seed, int)
                                                           else int(seed[c])) + start)
                    texts += chunk
                    self.stats.record(prompt_tokens=len(ids["input_ids"]), generated_tokens=decoded,
                                      seconds=time.perf_counter() - t0, rows=rows)
                    if on_batch is not None:
                        on_batch(c * n + start + rows, len(prompts) * n)
                out.append(texts)
                if on_prompt is not None:
                    on_prompt(c, texts)
        return out

    def _generate_batch(self, conversations: list[list[dict]], temperature: float, top_p: float,
                        max_new_tokens: int, seed: int) -> list[str]:
        import torch

        from spogw.completions import Completion

        tok, model = self._tokenizer, self._model
        start = time.perf_counter()
        text = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
        enc = tok(text, return_tensors="pt", padding=True, truncation=True, max_length=self.max_prompt_tokens,
                  add_special_tokens=False).to(model.device)
        if temperature > 0:
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": None}
        else:
            sampling = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, **sampling)
        width = enc["input_ids"].shape[1]
        results, generated = [], 0
        for row in out:
            new = row[width:]
            stop = (new == tok.eos_token_id).nonzero()
            new = new[: int(stop[0]) if len(stop) else len(new)]
            generated += len(new)
            results.append(Completion(tok.decode(new, skip_special_tokens=True), new.tolist()))
        self.stats.record(prompt_tokens=int(enc["attention_mask"].sum()), generated_tokens=generated,
                          seconds=time.perf_counter() - start, rows=len(conversations))
        return results
