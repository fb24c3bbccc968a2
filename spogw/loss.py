"""The ioGRPO-mKL objective (paper Eq. 3.6, DESIGN §1 step 4), as a pure tensor function.

    J = 1/B Σ_i 1/|y_i| Σ_t [ min(r·A_i, clip(r, 1−ε, 1+ε)·A_i) − β·m_i·KL_t ]
    r    = π_θ / π_old                                (per token)
    KL_t = π_ref/π_θ − log(π_ref/π_θ) − 1             (the k3 estimator, always ≥ 0)
    m_i  = 1[A_i > 0] with kl_mask, else 1            (advantage-masked KL, "mKL")
    loss = −J

Departures from textbook GRPO, on purpose: π_old is the checkpoint that produced the offline data
(not the policy a few steps ago), so old log-probs come precomputed with the data; the KL penalty is
masked to responses with a positive advantage; a group's responses are weighted equally whatever
their length (per-response mean over tokens, then mean over responses), exactly as in Eq. 3.6.
"""

from __future__ import annotations

import torch

LOG_RATIO_CLAMP = 20.0  # exp(20) ≈ 5e8: keeps exp() finite when a policy drifts far from the reference


def iogrpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    epsilon: float = 0.2,
    beta: float = 0.1,
    kl_mask: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Return ``(loss, metrics)`` for a batch of B responses padded to T tokens.

    Args:
        logps: (B, T) log π_θ of each response token (carries the gradient).
        old_logps: (B, T) log π_old of the same tokens (no gradient).
        ref_logps: (B, T) log π_ref, or None when ``beta == 0``.
        advantages: (B,) group-normalised advantage of each response.
        completion_mask: (B, T) 1 for response tokens, 0 for padding (and prompt positions).
        epsilon: PPO clip range ε (ratio clipped to [1 − ε, 1 + ε]).
        beta: KL coefficient β; 0 removes the KL term (and the need for ``ref_logps``).
        kl_mask: apply the KL only to responses with A > 0 (mKL); False gives GRPO's uniform KL.

    Returns:
        The scalar loss −J and detached metrics: ``policy`` (the clipped surrogate term of J),
        ``kl`` (mean k3 KL over the tokens the penalty applies to), ``kl_all`` (over all tokens),
        ``clip_frac_low`` / ``clip_frac_high`` (token fraction where the clip binds),
        ``ratio_mean`` / ``ratio_max``, ``adv_mean`` / ``adv_std``, ``kl_weight`` (fraction of
        responses under the penalty).
    """
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if logps.shape != old_logps.shape or logps.shape != completion_mask.shape:
        raise ValueError(f"logps {tuple(logps.shape)}, old_logps {tuple(old_logps.shape)} and completion_mask "
                         f"{tuple(completion_mask.shape)} must have the same (B, T) shape")
    if advantages.shape != logps.shape[:1]:
        raise ValueError(f"advantages must have shape ({logps.shape[0]},), got {tuple(advantages.shape)}")
    if beta > 0 and ref_logps is None:
        raise ValueError("ref_logps is required when beta > 0")

    mask = completion_mask.to(logps.dtype)
    adv = advantages.to(logps.dtype).unsqueeze(1)  # (B, 1): the same advantage for every token of a response
    log_ratio = (logps - old_logps).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    clipped = ratio.clamp(1.0 - epsilon, 1.0 + epsilon)
    # min(r·A, clip(r)·A): for A > 0 the clip binds above 1 + ε, for A < 0 below 1 − ε.
    surrogate = torch.minimum(ratio * adv, clipped * adv)

    per_token = surrogate
    kl = torch.zeros_like(logps)
    weight = torch.ones_like(advantages, dtype=logps.dtype)
    if beta > 0:
        ref_log_ratio = (ref_logps - logps).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        kl = torch.exp(ref_log_ratio) - ref_log_ratio - 1.0
        if kl_mask:
            weight = (advantages > 0).to(logps.dtype)
        per_token = surrogate - beta * weight.unsqueeze(1) * kl

    lengths = mask.sum(dim=1).clamp(min=1.0)  # an empty response contributes 0, not NaN
    objective = ((per_token * mask).sum(dim=1) / lengths).mean()
    loss = -objective

    with torch.no_grad():
        n_tok = mask.sum().clamp(min=1.0)
        kl_tok = mask * weight.unsqueeze(1)
        metrics = {
            "policy": ((surrogate * mask).sum(dim=1) / lengths).mean(),
            "kl": (kl * kl_tok).sum() / kl_tok.sum().clamp(min=1.0),
            "kl_all": (kl * mask).sum() / n_tok,
            "clip_frac_low": (((ratio < 1.0 - epsilon) & (adv < 0)).to(mask.dtype) * mask).sum() / n_tok,
            "clip_frac_high": (((ratio > 1.0 + epsilon) & (adv > 0)).to(mask.dtype) * mask).sum() / n_tok,
            "ratio_mean": (ratio * mask).sum() / n_tok,
            "ratio_max": (ratio * mask).max() if mask.any() else ratio.new_tensor(1.0),
            "adv_mean": advantages.float().mean(),
            "adv_std": advantages.float().std() if advantages.numel() > 1 else advantages.new_zeros(()).float(),
            "kl_weight": weight.float().mean() if beta > 0 else weight.new_zeros(()).float(),
        }
    return loss, {k: v.detach() for k, v in metrics.items()}
