"""The LightningModule: π_θ = base model + LoRA, trained with the ioGRPO-mKL objective.

Iteration k trains on data that checkpoint k−1 sampled, so π_old = π_ref = π_{k−1} (paper §3.2):

* k = 1: π_{k−1} is the base model. π_θ is the base model with a fresh LoRA adapter; π_old/π_ref
  log-probs come from the same weights with the adapter switched off.
* k > 1: ``reference_adapter`` is the adapter of iteration k−1. It is loaded twice onto the one
  base model: as the trainable adapter ``default`` (so π_θ starts at π_{k−1} and the ratio starts
  at 1) and as a frozen copy ``reference``. Only LoRA weights are duplicated, never the base
  weights, and the adapter saved at the end is relative to the base model, so vLLM serves it as
  one LoRA request and peft loads it with ``PeftModel.from_pretrained``.

The ablations of the paper's Table 3 are ``kl_reference`` (``previous`` | ``base`` | ``none``) and
``kl_mask``. π_old is always π_{k−1}: it is the sampling policy, whatever the KL reference is.

Old/reference log-probs never change during an iteration (the data is offline), so each group's
are computed once, the first time the group is seen, and cached on the CPU: later epochs pay only
the policy's forward and backward. Log-probs are taken only at completion positions: the LM head
runs on those hidden states alone, not on every prompt position.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import lightning as L
import torch

from spogw.loss import iogrpo_loss

log = logging.getLogger(__name__)


@dataclass
class LoRA:
    """LoRA adapter settings (ignored when continuing from ``--model.reference_adapter``, whose own config wins)."""

    r: int = 16
    """Adapter rank."""
    alpha: int = 32
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapter input. Kept at 0 by the objective: ioGRPO takes π_θ's log-probs with dropout off,
    like π_old's, so that the ratio starts at exactly 1 (a value > 0 is recorded in the adapter and warned about)."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Names of the linear layers that get adapters ("all-linear" as the single entry targets all of them)."""

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"`--model.lora.r` must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"`--model.lora.alpha` must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`--model.lora.dropout` must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("`--model.lora.target_modules` must name at least one module")


class _ChunkedTokenLogps(torch.autograd.Function):
    """log softmax(h·Wᵀ / T)[target] per row of h, ``chunk`` rows at a time; the backward recomputes each chunk.

    The (rows × vocab) fp32 logits, their softmax and its gradient are a small model's largest tensors,
    and they would all be alive at the start of the backward next to every saved activation: chunking
    caps them at ``chunk`` rows (measured on SmolLM2-135M, 8 × 128 completion tokens: peak RSS 4.34 →
    3.70 GiB, step 3.0 → 2.8 s). W is frozen (LoRA does not adapt the head): no weight gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, temperature: float, dtype: torch.dtype):
        w, acc = weight.to(dtype), torch.promote_types(torch.float32, dtype)  # log-softmax in fp32 at least
        out = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        for i in range(0, hidden.shape[0], chunk):
            logits = (hidden[i:i + chunk].to(dtype) @ w.T).to(acc) / temperature
            out[i:i + chunk] = logits.gather(-1, targets[i:i + chunk, None]).squeeze(-1) - logits.logsumexp(-1)
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk, ctx.temperature, ctx.dtype = chunk, temperature, dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, targets = ctx.saved_tensors
        w, acc = weight.to(ctx.dtype), torch.promote_types(torch.float32, ctx.dtype)
        grad_hidden = torch.empty_like(hidden)
        for i in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(i, i + ctx.chunk)
            logits = (hidden[rows].to(ctx.dtype) @ w.T).to(acc) / ctx.temperature
            g = grad[rows, None].to(acc)
            d = torch.softmax(logits, -1).mul_(-g)  # d logp[target] / d logits = onehot(target) − softmax
            d.scatter_add_(-1, targets[rows, None], g)
            grad_hidden[rows] = ((d / ctx.temperature).to(ctx.dtype) @ w).to(hidden.dtype)
        return grad_hidden, None, None, None, None, None


HEAD_CHUNK = 128  # rows of the LM head computed at once (see _ChunkedTokenLogps)


def token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor,
                temperature: float = 1.0) -> torch.Tensor:
    """(B, L) log p(token_j | tokens_<j) at completion positions j, 0 elsewhere.

    Runs the decoder once, then the LM head only on the hidden states that predict a completion
    token (for a 128-token prompt that halves the head's work), in chunks whose logits are recomputed
    in the backward rather than kept: they are the largest activation of a small model.
    """
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = lm.get_decoder(), lm.get_output_embeddings()
    if attention_mask is not None and _right_padded(attention_mask):
        # Causal attention never lets a token see the padding after it: the mask changes nothing that is
        # scored, and without it attention runs the fused causal kernel instead of materialising the
        # (L x L) scores of every layer for the backward (1.6x faster, -1.7 GB at 4 x 1,700 tokens).
        attention_mask = None
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    predicts = completion_mask[:, 1:].bool()  # position j-1 predicts token j
    rows, targets = hidden[:, :-1][predicts], input_ids[:, 1:][predicts]
    plain_head = isinstance(head, torch.nn.Linear) and head.bias is None and not head.weight.requires_grad
    if plain_head:
        device = rows.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else head.weight.dtype
        picked = _ChunkedTokenLogps.apply(rows, head.weight, targets, HEAD_CHUNK, temperature, dtype)
    else:  # a trained, biased or wrapped head: the plain path
        logits = head(rows).float() / temperature
        picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    out = torch.zeros(input_ids.shape, dtype=picked.dtype, device=picked.device)
    out[:, 1:][predicts] = picked
    return out


def _right_padded(attention_mask: torch.Tensor) -> bool:
    """Whether every row's attended tokens are a prefix of it (padding, if any, only on the right)."""
    lengths = attention_mask.sum(dim=1, keepdim=True)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return bool(torch.equal(attention_mask.bool(), positions.unsqueeze(0) < lengths))


class SPOGWModule(L.LightningModule):
    """ioGRPO-mKL training of a LoRA adapter on an HF causal LM.

    Args:
        model: HF model directory or hub id, or ``embedded`` (SmolLM2-135M-Instruct from its PyPI package).
        reference_adapter: LoRA adapter of the previous iteration (π_{k−1}); None for the first iteration.
        beta: KL coefficient β (paper: 0.1); 0 switches the KL term off.
        epsilon: PPO clip range ε: the ratio π_θ/π_old is clipped to [1 − ε, 1 + ε].
        kl_mask: apply the KL penalty only to responses with a positive advantage (mKL, paper Eq. 3.5).
        kl_reference: the KL's reference: ``previous`` checkpoint (the method), ``base`` model, or ``none``.
        lora: LoRA settings for a fresh adapter.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear learning-rate warm-up steps (then constant).
        temperature: divide logits by this before log-softmax (match the sampling temperature if desired).
        dtype: dtype the base weights are loaded in (``float32``, ``bfloat16``, ...); None keeps the checkpoint's.
        gradient_checkpointing: recompute activations in the backward pass to save memory.
    """

    def __init__(
        self,
        model: str = "embedded",
        reference_adapter: str | None = None,
        beta: float = 0.1,
        epsilon: float = 0.2,
        kl_mask: bool = True,
        kl_reference: Literal["previous", "base", "none"] = "previous",
        lora: LoRA = LoRA(),  # noqa: B008 - a frozen-in-practice default, shown in --help and config.yaml
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        temperature: float = 1.0,
        dtype: str | None = None,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        if beta < 0:
            raise ValueError(f"`--model.beta` must be >= 0, got {beta}")
        if epsilon <= 0:
            raise ValueError(f"`--model.epsilon` must be > 0, got {epsilon}")
        if lr <= 0:
            raise ValueError(f"`--model.lr` must be > 0, got {lr}")
        if warmup_steps < 0:
            raise ValueError(f"`--model.warmup_steps` must be >= 0, got {warmup_steps}")
        if temperature <= 0:
            raise ValueError(f"`--model.temperature` must be > 0, got {temperature}")
        if kl_reference not in ("previous", "base", "none"):
            raise ValueError(f"`--model.kl_reference` must be previous, base or none, got {kl_reference!r}")
        if reference_adapter is not None and not (Path(reference_adapter) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"`--model.reference_adapter`: no peft adapter (adapter_config.json) in "
                                    f"{reference_adapter}; pass the adapter directory of the previous iteration")
        self.save_hyperparameters()
        self.model_name = model
        self.reference_adapter = reference_adapter
        self.beta = 0.0 if kl_reference == "none" else beta
        self.epsilon = epsilon
        self.kl_mask = kl_mask
        self.kl_reference = kl_reference
        self.lora = lora
        self.temperature = temperature
        self.policy = None
        self._dropouts: list[torch.nn.Module] = []
        self._ref_cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.strict_loading = False  # checkpoints hold the trainable (LoRA) weights only

    # -- model -----------------------------------------------------------------------------

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        from peft import LoraConfig, PeftModel, get_peft_model

        from spogw.models import load_causal_lm

        base = load_causal_lm(self.model_name, dtype=self.hparams.dtype)
        base.config.use_cache = False
        if self.reference_adapter is None:
            targets = self.lora.target_modules
            config = LoraConfig(r=self.lora.r, lora_alpha=self.lora.alpha, lora_dropout=self.lora.dropout,
                                target_modules=targets[0] if targets == ["all-linear"] else targets,
                                task_type="CAUSAL_LM", bias="none")
            policy = get_peft_model(base, config)
        else:
            policy = PeftModel.from_pretrained(base, self.reference_adapter, adapter_name="default", is_trainable=True)
            policy.load_adapter(self.reference_adapter, adapter_name="reference", is_trainable=False)
            policy.set_adapter("default")
        if self.hparams.gradient_checkpointing:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            policy.enable_input_require_grads()
        for name, p in policy.named_parameters():
            p.requires_grad_(".default." in name and "lora_" in name)
        policy.train()  # from_pretrained returns eval mode
        self.policy = policy
        # Every dropout of the policy (LoRA's, and the base model's if it has any) stays off: π_θ's log-probs
        # must be the same function as π_old's, which are taken in eval mode, or the ratio would not start at 1
        # (with LoRA dropout 0.05 it measured 0.65-1.36 at step 0 of iteration 2).
        self._dropouts = [m for m in policy.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
        if self._dropouts:
            log.warning("dropout (p=%s) is turned off: ioGRPO compares π_θ with π_old token by token, so both are "
                        "taken without dropout", sorted({m.p for m in self._dropouts}))

    @contextlib.contextmanager
    def _weights(self, which: Literal["policy", "previous", "base"]):
        """Run the model as π_θ, as π_{k−1}, or as the base model, without copying weights."""
        if which == "policy":
            yield
        elif which == "base" or self.reference_adapter is None:
            with self.policy.disable_adapter():
                yield
        else:
            # peft's set_adapter toggles requires_grad; put the trainable flags back afterwards.
            flags = {n: p.requires_grad for n, p in self.policy.named_parameters() if "lora_" in n}
            self.policy.set_adapter("reference")
            try:
                yield
            finally:
                self.policy.set_adapter("default")
                for n, p in self.policy.named_parameters():
                    if n in flags:
                        p.requires_grad_(flags[n])

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.policy.parameters() if p.requires_grad]

    # -- log-probs -------------------------------------------------------------------------

    def _logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        for m in self._dropouts:  # Lightning's train() turns them back on at every epoch
            m.eval()
        return token_logps(self.policy, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                           self.temperature)

    @torch.no_grad()
    def reference_logps(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        """π_old and π_ref log-probs for a batch: one forward when they are the same model, two otherwise."""
        was_training = self.policy.training
        self.policy.eval()  # no LoRA dropout: the reference is a fixed function
        try:
            with self._weights("previous"):
                old = self._logps(batch)
            if self.beta == 0:
                ref = None
            elif self.kl_reference == "base" and self.reference_adapter is not None:
                with self._weights("base"):
                    ref = self._logps(batch)
            else:
                ref = old
        finally:
            self.policy.train(was_training)
        return {"old_logps": old, "ref_logps": ref}

    def _cached_reference(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Old/ref log-probs from the per-group cache; the missing responses are computed once."""
        keys = list(zip(batch["group_id"].tolist(), batch["member"].tolist(), strict=True))
        mask = batch["completion_mask"].bool()
        missing = [i for i, k in enumerate(keys) if k not in self._ref_cache]
        if missing:
            sub = {k: v[missing] for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dim() >= 1}
            out = self.reference_logps(sub)
            sub_mask = sub["completion_mask"].bool()
            for row, i in enumerate(missing):
                old = out["old_logps"][row][sub_mask[row]].detach().cpu()
                ref = None if out["ref_logps"] is None else out["ref_logps"][row][sub_mask[row]].detach().cpu()
                self._ref_cache[keys[i]] = (old, ref)
        old = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        old[mask] = torch.cat([self._ref_cache[k][0] for k in keys]).to(mask.device)
        if self.beta == 0:
            return old, None
        ref = torch.zeros_like(old)
        ref[mask] = torch.cat([self._ref_cache[k][1] for k in keys]).to(mask.device)
        return old, ref

    # -- training --------------------------------------------------------------------------

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int = 0) -> torch.Tensor:
        if "old_logps" in batch:
            old, ref = batch["old_logps"], batch.get("ref_logps")
        else:
            old, ref = self._cached_reference(batch)
        logps = self._logps(batch)
        loss, metrics = iogrpo_loss(logps, old.to(logps.dtype), None if ref is None else ref.to(logps.dtype),
                                    batch["advantages"], batch["completion_mask"], epsilon=self.epsilon,
                                    beta=self.beta, kl_mask=self.kl_mask)
        n_groups = int(batch["group_id"].unique().numel())
        self.log("train/loss", loss, prog_bar=True, batch_size=n_groups)
        self.log_dict({f"train/{k}": v for k, v in metrics.items()}, batch_size=n_groups)
        if "scores" in batch:
            self.log("train/score_mean", batch["scores"].float().mean(), batch_size=n_groups)
        self.log("train/response_tokens", batch["completion_mask"].sum().float(), reduce_fx="sum",
                 batch_size=n_groups)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        # Before clipping: the norm the optimizer would have seen without --trainer.gradient_clip_val.
        grads = [p.grad.detach().float().norm() for p in self.trainable_parameters() if p.grad is not None]
        if grads:
            self.log("train/grad_norm", torch.stack(grads).norm())
        self.log("train/lr", float(optimizer.param_groups[0]["lr"]))

    def configure_optimizers(self):
        params = self.trainable_parameters()
        opt = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        warmup = self.hparams.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / (warmup + 1)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "name": "train/lr"}}

    # -- saving ----------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Lightning checkpoints keep only the trainable weights: the base model is on disk already.
        trainable = {f"policy.{n}" for n, p in self.policy.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero:
            self.save_adapter(Path(self.trainer.default_root_dir) / "adapter")

    def save_adapter(self, path: str | Path) -> Path:
        """Save π_θ's adapter in peft format (adapter_config.json + adapter_model.safetensors)."""
        path = Path(path)
        self.policy.save_pretrained(str(path), selected_adapters=["default"])
        log.info("saved LoRA adapter to %s", path)
        return path

    def count_parameters(self) -> dict[str, int]:
        trainable = sum(p.numel() for p in self.trainable_parameters())
        return {"trainable": trainable, "total": sum(p.numel() for p in self.policy.parameters())}
