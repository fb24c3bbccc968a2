"""The LightningModule: log-probs, reference handling, the cache, and the KL ablations."""

from __future__ import annotations

import pytest
import torch

from spogw.data import Curation, GroupDataModule
from spogw.module import LoRA, SPOGWModule, token_logps


@pytest.fixture
def batch(tmp_path, tiny_model, scored_file):
    dm = GroupDataModule(str(scored_file), tokenizer=tiny_model, curation=Curation(n=6, t=2, top_n=4),
                         run_dir=str(tmp_path), groups_per_batch=2, shuffle=False)
    dm.setup()
    return next(iter(dm.train_dataloader()))


def _module(tiny_model, **kwargs) -> SPOGWModule:
    torch.manual_seed(0)
    module = SPOGWModule(model=tiny_model, lora=LoRA(r=4, alpha=8, dropout=0.0), **kwargs)
    module.configure_model()
    return module


def test_token_logps_match_a_full_forward(tiny_model, batch):
    module = _module(tiny_model)
    got = token_logps(module.policy, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    logits = module.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    full = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    mask = batch["completion_mask"][:, 1:].bool()
    assert torch.allclose(got[:, 1:][mask], full[mask], atol=1e-5)
    assert torch.all(got[:, 1:][~mask] == 0) and torch.all(got[:, 0] == 0)


def test_first_step_has_ratio_one_and_no_kl(tiny_model, batch):
    module = _module(tiny_model)
    loss = module.training_step(batch, 0)
    # ratio = 1, KL = 0: the loss is minus the mean advantage, which is 0 for normalised groups
    assert loss.item() == pytest.approx(-batch["advantages"].mean().item(), abs=1e-6)
    ref = module.reference_logps(batch)
    assert torch.equal(ref["old_logps"], ref["ref_logps"])  # iteration 1: both are the base model


class CountingModule(SPOGWModule):
    calls = 0

    def reference_logps(self, batch):
        type(self).calls += batch["input_ids"].shape[0]
        return super().reference_logps(batch)


def test_reference_logps_are_computed_once_per_response(tiny_model, batch):
    CountingModule.calls = 0
    torch.manual_seed(0)
    module = CountingModule(model=tiny_model, lora=LoRA(r=4, alpha=8, dropout=0.0))
    module.configure_model()
    opt = torch.optim.SGD(module.trainable_parameters(), lr=1.0)
    for _ in range(3):  # three epochs over the same batch
        opt.zero_grad()
        module.training_step(batch, 0).backward()
        opt.step()
    assert CountingModule.calls == batch["input_ids"].shape[0]
    # and the cached values are the reference's, not the updated policy's
    old, _ = module._cached_reference(batch)
    with module._weights("base"):
        fresh = module._logps(batch)
    assert torch.allclose(old, fresh.float(), atol=1e-6)


def _trained_adapter(tiny_model, path) -> str:
    """An adapter whose LoRA B is non-zero, so π_{k-1} differs from the base model."""
    module = _module(tiny_model)
    with torch.no_grad():
        for name, p in module.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    module.save_adapter(path)
    return str(path)


def test_continuing_from_a_previous_adapter(tmp_path, tiny_model, batch):
    prev = _trained_adapter(tiny_model, tmp_path / "prev")
    module = _module(tiny_model, reference_adapter=prev)
    # π_θ starts at π_{k-1}: the ratio is 1 on the first step
    ref = module.reference_logps(batch)
    assert torch.allclose(module._logps(batch), ref["old_logps"], atol=1e-6)
    # π_{k-1} is not the base model
    with module._weights("base"):
        base = module._logps(batch)
    assert not torch.allclose(base, ref["old_logps"], atol=1e-3)
    # one copy of the base weights: the parameter count is base + two adapters
    base_count = sum(p.numel() for n, p in module.policy.named_parameters() if "lora_" not in n)
    lora = {n: p for n, p in module.policy.named_parameters() if "lora_" in n}
    assert len([n for n in lora if ".default." in n]) == len([n for n in lora if ".reference." in n])
    fresh = SPOGWModule(model=tiny_model)
    fresh.configure_model()
    assert base_count == sum(p.numel() for n, p in fresh.policy.named_parameters() if "lora_" not in n)
    # only the policy adapter trains; the reference adapter and the base stay frozen through a step
    trainable = {n for n, p in module.policy.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters() if n not in trainable}
    opt = torch.optim.SGD(module.trainable_parameters(), lr=0.1)
    module.training_step(batch, 0).backward()
    opt.step()
    after = dict(module.policy.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert {n for n, p in module.policy.named_parameters() if p.requires_grad} == trainable


def test_kl_reference_ablations(tmp_path, tiny_model, batch):
    prev = _trained_adapter(tiny_model, tmp_path / "prev")
    previous = _module(tiny_model, reference_adapter=prev, kl_reference="previous").reference_logps(batch)
    base = _module(tiny_model, reference_adapter=prev, kl_reference="base").reference_logps(batch)
    none = _module(tiny_model, reference_adapter=prev, kl_reference="none").reference_logps(batch)
    assert torch.equal(previous["old_logps"], previous["ref_logps"])
    assert torch.allclose(base["old_logps"], previous["old_logps"])  # π_old is π_{k-1} whatever the KL reference
    assert not torch.allclose(base["ref_logps"], base["old_logps"], atol=1e-3)
    assert none["ref_logps"] is None


def test_checkpoints_keep_only_trainable_weights(tiny_model):
    module = _module(tiny_model)
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    assert ckpt["state_dict"] and all("lora_" in k and ".default." in k for k in ckpt["state_dict"])


@pytest.mark.parametrize("kwargs,flag", [
    ({"beta": -0.1}, "--model.beta"), ({"epsilon": 0.0}, "--model.epsilon"), ({"lr": 0.0}, "--model.lr"),
    ({"kl_reference": "ref"}, "--model.kl_reference"), ({"reference_adapter": "/nonexistent"},
                                                        "--model.reference_adapter"),
])
def test_invalid_options_name_the_flag(kwargs, flag):
    with pytest.raises((ValueError, FileNotFoundError), match=flag):
        SPOGWModule(**kwargs)


@pytest.mark.parametrize("rows,chunk", [(1, 128), (130, 64), (100, 32)])
def test_chunked_head_equals_log_softmax_in_value_and_gradient(rows, chunk):
    from spogw.module import _ChunkedTokenLogps

    g = torch.Generator().manual_seed(rows)
    h = torch.randn(rows, 8, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(20, 8, dtype=torch.float64, generator=g)
    t = torch.randint(0, 20, (rows,), generator=g)
    assert torch.autograd.gradcheck(lambda x: _ChunkedTokenLogps.apply(x, w, t, chunk, 0.7, torch.float64), (h,))
    logits = (h @ w.T) / 0.7
    expected = torch.log_softmax(logits, -1).gather(-1, t[:, None]).squeeze(-1)
    assert torch.allclose(_ChunkedTokenLogps.apply(h, w, t, chunk, 0.7, torch.float64), expected)


def test_right_padding_needs_no_attention_mask_and_other_masks_are_kept(tiny_model):
    """token_logps drops the mask of a right-padded batch (the fused causal kernel): the scored values must be
    exactly those computed with the mask. A mask with a hole is not right padding and must be applied."""
    import torch

    from spogw.models import load_causal_lm
    from spogw.module import _right_padded, token_logps

    model = load_causal_lm(tiny_model).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(20, 1000, (3, 40), generator=gen)
    completion = torch.zeros(3, 40, dtype=torch.long)
    completion[:, 20:] = 1

    def with_mask(mask):
        lm = model.get_decoder()
        hidden = lm(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        logits = model.get_output_embeddings()(hidden[:, :-1]).float()
        out = torch.zeros(ids.shape)
        out[:, 1:] = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1) * (completion * mask)[:, 1:]
        return out

    right = torch.ones(3, 40, dtype=torch.long)
    right[1, 30:] = 0
    right[2, 35:] = 0
    holed = right.clone()
    holed[2, 5:8] = 0
    assert _right_padded(right) and not _right_padded(holed) and not _right_padded(right.flip(1))
    with torch.no_grad():
        for mask in (right, holed):
            assert torch.allclose(token_logps(model, ids, mask, completion * mask), with_mask(mask), atol=1e-5)
        assert not torch.allclose(with_mask(holed)[2], with_mask(right)[2], atol=1e-3)  # the hole matters
