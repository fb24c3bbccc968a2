"""The floor of ``train_step.py``: the least work any implementation of the step must do.

As the issue defines it: one policy forward + backward through the peft LoRA model, reference
log-probs computed once beforehand (not timed in the step), log-probs taken only at completion
positions (the LM head and the log-softmax see 128 positions per sequence, not 256), and no loss
extras (the loss is the plain policy-gradient term -mean(A * log p); no ratio, clip, KL or metrics).
The AdamW step on the LoRA weights is included (it takes milliseconds) so the floor covers the same
span as the other sides' steps.
"""

from __future__ import annotations

from _common import MODEL, Clock, PeakMemory, Settings, fixed_batch, lora_config, report_step, wait_for_go
from _sections import Sections


def completion_logps(causal_lm, input_ids, attention_mask, prompt_len: int, sections: Sections | None = None):
    """log p(token_j | tokens_<j) for the completion tokens only: (B, L - prompt_len)."""
    import torch

    backbone, lm_head = causal_lm.model, causal_lm.lm_head
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    # Position j predicts token j + 1: the completion tokens [P, L) are predicted from positions [P - 1, L - 1).
    logits = lm_head(hidden[:, prompt_len - 1:-1])
    targets = input_ids[:, prompt_len:]
    logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if sections is not None:
        sections.mark("forward: log-softmax + gather")
    return logps


def run_floor(settings: Settings) -> dict:
    import torch
    from peft import get_peft_model

    from spogw.models import load_causal_lm

    model = get_peft_model(load_causal_lm(MODEL), lora_config(settings))
    model.train()
    causal_lm = model.get_base_model()
    prompt, completions, rewards = fixed_batch(settings, causal_lm.config.vocab_size)
    input_ids = torch.cat([prompt.expand(settings.group, -1), completions], dim=1)
    attention_mask = torch.ones_like(input_ids)
    advantages = (rewards - rewards.mean()) / (rewards.std() + 1e-4)
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)

    memory = PeakMemory()
    memory.start()
    with Clock() as ref, torch.no_grad(), model.disable_adapter(), autocast():
        ref_logps = completion_logps(causal_lm, input_ids, attention_mask, settings.prompt_len)
    assert ref_logps.shape == completions.shape  # computed once, beforehand; the floor's loss does not use it

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.lr)
    sections = Sections(causal_lm)
    while wait_for_go():
        with Clock() as step:
            sections.begin()
            with autocast():
                logps = completion_logps(causal_lm, input_ids, attention_mask, settings.prompt_len, sections)
                loss = -(advantages.unsqueeze(1) * logps).mean()
            sections.mark("forward: loss")
            loss.backward()
            sections.mark("backward")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sections.mark("optimizer")
        report_step(step_s=step.wall, cpu_s=step.cpu, sections=sections.end())
    return {"side": "floor", "first_ref_s": ref.wall, **memory.report()}
