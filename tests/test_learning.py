"""The learner learns: a few optimizer steps move a fixed group the right way, the KL reaches only the members it
should, π_old stays the checkpoint that sampled the data, and the ratio starts at exactly 1 at every iteration.

These are the guards against a learner that runs but learns the wrong thing (advantage sign flipped, the KL mask
ignored, π_old taken from the current policy): each such mutation fails at least one test here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from spogw.data import Curation, GroupDataModule
from spogw.module import LoRA, SPOGWModule, token_logps

SCORES = (0.0, 0.25, 0.75, 1.0)


def write_groups(path: Path, queries: int = 2) -> Path:
    """One group of four per query, scores SCORES, every completion a different workflow-like text."""
    with path.open("w") as f:
        for q in range(queries):
            for i, score in enumerate(SCORES):
                body = f"        return await self.step_{q}_{i}(problem)  # variant {i}\n" * (1 + i % 2)
                completion = "class Workflow:\n    async def __call__(self, problem):\n" + body
                f.write(json.dumps({"query_id": f"q{q}", "sample": i, "score": score, "completion": completion,
                                    "prompt": [{"role": "user", "content": f"Write a workflow for task {q}."}]})
                        + "\n")
    return path


@pytest.fixture
def batches(tmp_path, tiny_model) -> list[dict]:
    dm = GroupDataModule(str(write_groups(tmp_path / "scored.jsonl")), tokenizer=tiny_model,
                         curation=Curation(n=4, t=2, top_n=1, scope="per_query"), run_dir=str(tmp_path),
                         groups_per_batch=1, shuffle=False)
    dm.setup()
    out = list(dm.train_dataloader())
    assert len(out) == 2 and all(b["input_ids"].shape[0] == 4 for b in out)
    return out


class Recording(SPOGWModule):
    """Keeps π_θ's log-probs of the last training step, so a test can read their gradient."""

    def _logps(self, batch):
        out = super()._logps(batch)
        if out.requires_grad:
            out.retain_grad()
            self.recorded = out
        return out


def make(tiny_model, cls=SPOGWModule, **kwargs) -> SPOGWModule:
    torch.manual_seed(0)
    kwargs.setdefault("lora", LoRA(r=8, alpha=16))
    module = cls(model=tiny_model, **kwargs)
    module.configure_model()
    module.train()  # as Lightning does before the first step
    return module


def sequence_logps(module: SPOGWModule, batch: dict) -> torch.Tensor:
    """log π_θ(y_i | x_i) of every member, summed over its completion tokens."""
    with torch.no_grad():
        return module._logps(batch).sum(dim=1)


def perturb_adapter(module: SPOGWModule, std: float = 0.3) -> None:
    with torch.no_grad():
        for name, p in module.policy.named_parameters():
            if "lora_B" in name and ".default." in name:
                p.normal_(0, std, generator=torch.Generator().manual_seed(1))


def saved_adapter(tiny_model, path: Path, *, dropout: float = 0.0) -> str:
    """An adapter of a previous iteration whose weights differ from the base model (and, here, its dropout > 0)."""
    module = make(tiny_model, lora=LoRA(r=8, alpha=16, dropout=dropout))
    perturb_adapter(module)
    module.save_adapter(path)
    assert json.loads((path / "adapter_config.json").read_text())["lora_dropout"] == dropout
    return str(path)


@pytest.mark.parametrize("iteration", [1, 2])
def test_steps_on_a_fixed_group_raise_the_best_member_and_lower_the_worst(tmp_path, tiny_model, batches, iteration):
    batch = batches[0]
    previous = saved_adapter(tiny_model, tmp_path / "prev") if iteration == 2 else None
    module = make(tiny_model, reference_adapter=previous, lr=1e-3)
    scores = batch["scores"].tolist()
    best, worst = scores.index(max(scores)), scores.index(min(scores))
    assert batch["advantages"][best] > 0 > batch["advantages"][worst]
    start = sequence_logps(module, batch)
    opt = torch.optim.AdamW(module.trainable_parameters(), lr=1e-3)
    for _ in range(4):
        opt.zero_grad()
        module.training_step(batch, 0).backward()
        opt.step()
    moved = sequence_logps(module, batch) - start
    assert moved[best] > 0.05, f"the best member's log-probability did not rise: {moved.tolist()}"
    assert moved[worst] < -0.05, f"the worst member's log-probability did not fall: {moved.tolist()}"
    # and the members move in the order of their advantages, not just the two ends
    order = torch.argsort(batch["advantages"])
    assert moved[order[-1]] > moved[order[0]]


def test_with_the_mask_the_kl_gradient_reaches_only_members_with_a_positive_advantage(tiny_model, batches):
    batch = batches[0]
    grads = {}
    for kl_mask in (True, False):
        module = make(tiny_model, cls=Recording, beta=0.5, kl_mask=kl_mask)
        perturb_adapter(module)  # π_θ ≠ π_ref, so the KL and its gradient are not zero
        per_beta = {}
        for beta in (0.5, 0.0):
            module.beta = beta
            module.training_step(batch, 0).backward()
            per_beta[beta] = module.recorded.grad.clone()
        grads[kl_mask] = (per_beta[0.5] - per_beta[0.0]).abs().sum(dim=1)  # the KL term's share, per member
    positive = batch["advantages"] > 0
    assert positive.any() and (~positive).any()
    assert torch.all(grads[True][~positive] == 0), f"the masked KL reached A <= 0 members: {grads[True].tolist()}"
    assert torch.all(grads[True][positive] > 1e-6), f"the KL did not reach the A > 0 members: {grads[True].tolist()}"
    assert torch.all(grads[False] > 1e-6), f"without the mask the KL must reach every member: {grads[False].tolist()}"


def _frozen_logps(tiny_model, adapter: str | None, batch: dict) -> torch.Tensor:
    """log π_{k-1} from a model loaded afresh: the base model, or the base model + the previous adapter."""
    from peft import PeftModel

    from spogw.models import load_causal_lm

    model = load_causal_lm(tiny_model)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    with torch.no_grad():
        return token_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])


@pytest.mark.parametrize("iteration", [1, 2])
def test_pi_old_stays_the_frozen_checkpoint_after_updates(tmp_path, tiny_model, batches, iteration):
    previous = saved_adapter(tiny_model, tmp_path / "prev") if iteration == 2 else None
    module = make(tiny_model, cls=Recording, reference_adapter=previous, lr=1e-2)
    opt = torch.optim.AdamW(module.trainable_parameters(), lr=1e-2)
    for _ in range(3):  # update π_θ on the first batch only
        opt.zero_grad()
        module.training_step(batches[0], 0).backward()
        opt.step()
    second = batches[1]
    frozen = _frozen_logps(tiny_model, previous, second)
    mask = second["completion_mask"].bool()
    assert not torch.allclose(sequence_logps(module, second), frozen.sum(1), atol=1e-3), "π_θ did not move"
    old, ref = module._cached_reference(second)
    assert torch.allclose(old[mask], frozen[mask].float(), atol=1e-5), "π_old is not the checkpoint of k-1"
    assert torch.allclose(ref[mask], frozen[mask].float(), atol=1e-5), "π_ref is not the checkpoint of k-1"
    # and the training step itself compares π_θ with that frozen checkpoint, not with itself
    from spogw.loss import iogrpo_loss

    loss = module.training_step(second, 0)
    expected, _ = iogrpo_loss(module.recorded.detach(), frozen.float(), frozen.float(), second["advantages"],
                              second["completion_mask"], epsilon=module.epsilon, beta=module.beta, kl_mask=True)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert abs(loss.item() + second["advantages"].mean().item()) > 1e-3, "the ratio should have left 1 by now"


def test_the_ratio_starts_at_exactly_one_at_iteration_two_with_lora_dropout(tmp_path, tiny_model, batches):
    previous = saved_adapter(tiny_model, tmp_path / "prev", dropout=0.5)
    module = make(tiny_model, cls=Recording, reference_adapter=previous)
    assert module._dropouts, "the continued adapter carries dropout 0.5: the test needs it"
    batch = batches[0]
    loss = module.training_step(batch, 0)
    old, _ = module._cached_reference(batch)
    mask = batch["completion_mask"].bool()
    ratio = torch.exp(module.recorded.detach()[mask] - old[mask])
    assert torch.all(ratio == 1.0), f"step-0 ratios {ratio.min().item():.4f}..{ratio.max().item():.4f}"
    # ratio 1 and KL 0: the loss is minus the mean advantage
    assert loss.item() == pytest.approx(-batch["advantages"].mean().item(), abs=1e-6)


def test_guided_samples_train_on_their_decisions_only(tmp_path, tiny_model):
    """The loss sees the tokens the generator chose (the step, the instruction text), not the forced frame."""
    from spogw.models import load_tokenizer
    from spogw.workflows.guide import load_guide

    guide = load_guide("code")
    paths = guide.paths()
    with (tmp_path / "scored.jsonl").open("w") as f:
        for i, score in enumerate(SCORES):
            text = guide.render(paths[i * 5], [f"Solve it carefully {i}."] * 4)
            f.write(json.dumps({"query_id": "q", "sample": i, "score": score, "completion": text, "guided": True,
                                "family": "code", "prompt": [{"role": "user", "content": "Write a workflow."}]})
                    + "\n")
    masks = {}
    for train_on in ("decisions", "completion"):
        dm = GroupDataModule(str(tmp_path / "scored.jsonl"), tokenizer=tiny_model, run_dir=str(tmp_path),
                             curation=Curation(n=4, t=2, top_n=1), shuffle=False, train_on=train_on)
        dm.setup()
        masks[train_on] = next(iter(dm.train_dataloader()))
    tok = load_tokenizer(tiny_model)
    batch = masks["decisions"]
    for row in range(4):
        picked = tok.decode(batch["input_ids"][row][batch["completion_mask"][row].bool()])
        assert "carefully" in picked and "class" not in picked and "operator" not in picked, picked
        assert any(word in picked for word in (" solution", " plan", " candidates")), picked
        assert 0 < batch["completion_mask"][row].sum() < masks["completion"]["completion_mask"][row].sum() / 5
    assert torch.equal(batch["input_ids"], masks["completion"]["input_ids"])
    assert dm.stats["trained_on_decisions"] == 0  # the last module trained on whole completions


def test_samples_are_trained_on_the_tokens_they_were_sampled_as(tmp_path, tiny_model):
    """The guided decoder feeds the grammar segment by segment, so its tokens differ from a re-tokenisation of
    the finished text; the sample stage records them and the fit trains on exactly those."""
    from spogw.models import load_causal_lm, load_tokenizer
    from spogw.workflows.guide import load_guide
    from spogw.workflows.guided_decoding import TokenGuide, guided_generate

    tok = load_tokenizer(tiny_model)
    guide = TokenGuide(load_guide("code"), tok)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Write a workflow."}], add_generation_prompt=True,
                                     tokenize=False)
    texts, _ = guided_generate(load_causal_lm(tiny_model).eval(), tok(prompt, add_special_tokens=False)["input_ids"],
                               guide, n=4, temperature=1.0, top_p=1.0, max_new_tokens=600, seed=3)
    for text in texts:
        assert text.token_ids and "".join(guide.strings[i] for i in text.token_ids) == text
        assert list(text.token_ids) != tok(str(text), add_special_tokens=False)["input_ids"]  # they do differ
    with (tmp_path / "scored.jsonl").open("w") as f:
        for i, (text, score) in enumerate(zip(texts, SCORES, strict=True)):
            ids = list(text.token_ids) if i else [*text.token_ids[:-1], 0]  # sample 0: ids of another text
            f.write(json.dumps({"query_id": "q", "sample": i, "score": score, "completion": text, "guided": True,
                                "family": "code", "completion_ids": ids,
                                "prompt": [{"role": "user", "content": "Write a workflow."}]}) + "\n")
    dm = GroupDataModule(str(tmp_path / "scored.jsonl"), tokenizer=tiny_model, run_dir=str(tmp_path),
                         curation=Curation(n=4, t=2, top_n=1), shuffle=False)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert dm.stats["trained_as_sampled"] == 3 and dm.stats["trained_on_decisions"] == 4
    from spogw.data import tokenize_response

    prompt_len = len(tokenize_response(tok, [{"role": "user", "content": "Write a workflow."}], "")[0])
    for row in range(4):
        i = SCORES.index(batch["scores"][row].item())
        length = int(batch["attention_mask"][row].sum())
        got = batch["input_ids"][row, prompt_len:length - 1].tolist()  # the completion, without its EOS
        expected = list(texts[i].token_ids) if i else tok(str(texts[i]), add_special_tokens=False)["input_ids"]
        assert got == expected, f"sample {i}"
        picked = tok.decode(batch["input_ids"][row][batch["completion_mask"][row].bool()])
        assert picked and "class" not in picked and "operator" not in picked and "await" not in picked, picked
