"""The ioGRPO-mKL objective against hand-computed values and a per-token loop."""

from __future__ import annotations

import math

import pytest
import torch

from spogw.loss import iogrpo_loss


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def test_ratio_one_and_zero_kl_when_policy_equals_reference():
    logps = t([[-1.0, -2.0, 0.0], [-0.5, -0.1, -3.0]]).requires_grad_()
    mask = t([[1, 1, 0], [1, 1, 1]])
    loss, m = iogrpo_loss(logps, logps.detach(), logps.detach(), t([1.0, 2.0]), mask, beta=0.1)
    assert loss.item() == pytest.approx(-1.5)  # J = mean_i A_i when r = 1 and KL = 0
    assert m["ratio_mean"].item() == pytest.approx(1.0) and m["kl_all"].item() == 0.0
    loss.backward()
    # d(-J)/dlogp = -A_i/|y_i| per token (the KL gradient vanishes at θ = ref)
    expected = -t([[1 / 2, 1 / 2, 0], [2 / 3, 2 / 3, 2 / 3]]) / 2
    assert torch.allclose(logps.grad, expected)


def test_hand_computed_value():
    # Two responses; response 0 has 2 tokens (A = +1), response 1 has 1 token (A = -1).
    logps = t([[math.log(0.5), math.log(0.3)], [math.log(0.2), 0.0]])
    old = t([[math.log(0.4), math.log(0.3)], [math.log(0.25), 0.0]])
    ref = t([[math.log(0.25), math.log(0.6)], [math.log(0.1), 0.0]])
    mask = t([[1, 1], [1, 0]])
    eps, beta = 0.2, 0.1
    # response 0, A=+1: r = 1.25 -> clipped to 1.2 (binds: A > 0, r > 1+eps); r = 1.0 -> 1.0
    # KL k3 = ref/θ - log(ref/θ) - 1: token0 0.5 - log 0.5 - 1, token1 2 - log 2 - 1
    kl0 = (0.5 - math.log(0.5) - 1) + (2 - math.log(2) - 1)
    j0 = ((1.2 + 1.0) - beta * kl0) / 2
    # response 1, A=-1: r = 0.8 -> min(-0.8, clip(0.8)·-1 = -0.8) = -0.8; masked out of the KL
    j1 = -0.8
    loss, m = iogrpo_loss(logps, old, ref, t([1.0, -1.0]), mask, epsilon=eps, beta=beta, kl_mask=True)
    assert loss.item() == pytest.approx(-(j0 + j1) / 2)
    # unmasked: response 1 pays its KL too: ref/θ = 0.5
    kl1 = 0.5 - math.log(0.5) - 1
    loss_all, _ = iogrpo_loss(logps, old, ref, t([1.0, -1.0]), mask, epsilon=eps, beta=beta, kl_mask=False)
    assert loss_all.item() == pytest.approx(-(j0 + j1 - beta * kl1) / 2)
    assert m["clip_frac_high"].item() == pytest.approx(1 / 3) and m["clip_frac_low"].item() == 0.0


def test_masked_kl_ignores_responses_without_positive_advantage():
    torch.manual_seed(0)
    logps, old = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    ref = torch.randn(4, 5, dtype=torch.float64)
    adv, mask = t([1.0, 0.0, -2.0, 0.5]), torch.ones(4, 5, dtype=torch.float64)
    base, _ = iogrpo_loss(logps, old, ref, adv, mask, beta=0.5)
    ref2 = ref.clone()
    ref2[1:3] += 3.0  # move the reference only where A <= 0
    moved, _ = iogrpo_loss(logps, old, ref2, adv, mask, beta=0.5)
    assert moved.item() == pytest.approx(base.item())
    unmasked, _ = iogrpo_loss(logps, old, ref, adv, mask, beta=0.5, kl_mask=False)
    unmasked2, _ = iogrpo_loss(logps, old, ref2, adv, mask, beta=0.5, kl_mask=False)
    assert unmasked.item() != pytest.approx(unmasked2.item())
    ref3 = ref.clone()
    ref3[0] += 1.0  # ...but a positive-advantage response does feel it
    assert iogrpo_loss(logps, old, ref3, adv, mask, beta=0.5)[0].item() != pytest.approx(base.item())


@pytest.mark.parametrize("adv,log_r,binds", [
    (1.0, math.log(1.5), True),    # A > 0, r > 1 + ε: clipped, no gradient
    (1.0, math.log(0.5), False),   # A > 0, r < 1 − ε: the min keeps r·A, gradient flows
    (-1.0, math.log(0.5), True),   # A < 0, r < 1 − ε: clipped
    (-1.0, math.log(1.5), False),  # A < 0, r > 1 + ε: unclipped
])
def test_clipping_binds_only_on_the_side_of_the_advantage(adv, log_r, binds):
    logps = t([[log_r]]).requires_grad_()
    loss, m = iogrpo_loss(logps, t([[0.0]]), None, t([adv]), t([[1.0]]), epsilon=0.2, beta=0.0)
    loss.backward()
    r = math.exp(log_r)
    expected = min(r * adv, min(max(r, 0.8), 1.2) * adv)
    assert loss.item() == pytest.approx(-expected)
    assert (logps.grad.abs().item() == 0.0) == binds
    frac = m["clip_frac_high"].item() + m["clip_frac_low"].item()
    assert frac == (1.0 if binds else 0.0)


def test_beta_zero_removes_the_kl_term():
    torch.manual_seed(1)
    logps, old = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    adv, mask = t([0.3, -0.2, 1.0]), torch.ones(3, 4, dtype=torch.float64)
    no_kl, m = iogrpo_loss(logps, old, None, adv, mask, beta=0.0)
    far_ref = logps + 5.0
    assert iogrpo_loss(logps, old, far_ref, adv, mask, beta=0.0)[0].item() == pytest.approx(no_kl.item())
    assert iogrpo_loss(logps, old, far_ref, adv, mask, beta=0.1)[0].item() > no_kl.item()
    assert m["kl_weight"].item() == 0.0


def test_padding_is_ignored_and_responses_weigh_equally():
    logps = t([[-1.0, -9.0, -9.0], [-1.0, -1.0, -1.0]])
    old = t([[-1.0, 0.0, 0.0], [-1.0, -1.0, -1.0]])
    mask = t([[1, 0, 0], [1, 1, 1]])
    loss, _ = iogrpo_loss(logps, old, old, t([2.0, 4.0]), mask, beta=0.1)
    assert loss.item() == pytest.approx(-3.0)  # (2 + 4) / 2: one token or three, each response counts once


def _loop_reference(logps, old, ref, adv, mask, eps, beta, kl_mask):
    total = 0.0
    for i in range(logps.shape[0]):
        terms = []
        for j in range(logps.shape[1]):
            if mask[i, j] == 0:
                continue
            r = math.exp(logps[i, j] - old[i, j])
            a = adv[i].item()
            pg = min(r * a, min(max(r, 1 - eps), 1 + eps) * a)
            x = math.exp(ref[i, j] - logps[i, j])
            kl = x - math.log(x) - 1
            w = (1.0 if a > 0 else 0.0) if kl_mask else 1.0
            terms.append(pg - beta * w * kl)
        total += sum(terms) / max(len(terms), 1)
    return -total / logps.shape[0]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("kl_mask", [True, False])
@pytest.mark.parametrize("shape", [(1, 1), (8, 16), (5, 33)])
def test_vectorised_equals_loop(seed, kl_mask, shape):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(shape, generator=g, dtype=torch.float64) * 3
    old = logps + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)
    ref = logps + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)
    adv = torch.randn(shape[0], generator=g, dtype=torch.float64)
    mask = (torch.rand(shape, generator=g) > 0.3).double()
    got, _ = iogrpo_loss(logps, old, ref, adv, mask, epsilon=0.2, beta=0.1, kl_mask=kl_mask)
    assert got.item() == pytest.approx(_loop_reference(logps, old, ref, adv, mask, 0.2, 0.1, kl_mask), rel=1e-10)


@pytest.mark.parametrize("kwargs,match", [({"epsilon": 0.0}, "epsilon"), ({"beta": -0.1}, "beta")])
def test_invalid_hyperparameters(kwargs, match):
    x = torch.zeros(1, 1)
    with pytest.raises(ValueError, match=match):
        iogrpo_loss(x, x, x, torch.zeros(1), torch.ones(1, 1), **kwargs)


def test_missing_reference_with_kl_is_an_error():
    x = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="ref_logps"):
        iogrpo_loss(x, x, None, torch.zeros(1), torch.ones(1, 1), beta=0.1)
