"""Our side of ``train_step.py``: ``spogw.module.SPOGWModule`` on the same fixed batch.

The module is driven the way Lightning drives it with ``precision="bf16-mixed"`` on the CPU, minus
the Trainer loop: ``training_step`` under ``torch.autocast("cpu", bfloat16)``, ``loss.backward()``,
``optimizer.step()`` + ``zero_grad`` and the LR scheduler step. Two figures come out:

* the steady-state step, with the batch's old/reference log-probs already attached (offline data:
  they are computed once per iteration, the first time a group is seen);
* the one-off reference pass per batch (``module.reference_logps``: one no-grad forward with the
  adapter off, since for the first iteration π_old = π_ref = the base model).
"""

from __future__ import annotations

import logging
import warnings

from _common import MODEL, PeakMemory, Settings, StepTimer, fixed_batch
from _sections import Sections


def our_batch(settings: Settings, vocab_size: int) -> dict:
    """The fixed batch in the module's layout: one group of ``group`` responses, prompt + completion rows."""
    import torch

    from spogw.groups import advantages

    prompt, completions, rewards = fixed_batch(settings, vocab_size)
    input_ids = torch.cat([prompt.expand(settings.group, -1), completions], dim=1)
    completion_mask = torch.zeros_like(input_ids)
    completion_mask[:, settings.prompt_len:] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "completion_mask": completion_mask,
        "advantages": torch.tensor(advantages(rewards.tolist()), dtype=torch.float32),
        "scores": rewards,
        "group_id": torch.zeros(settings.group, dtype=torch.long),
        "member": torch.arange(settings.group),
    }


def run_ours(settings: Settings) -> dict:
    import torch

    from spogw.module import LoRA, SPOGWModule

    logging.getLogger("lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer attached: logging is a no-op
    module = SPOGWModule(
        model=MODEL, beta=settings.beta, lr=settings.lr,
        lora=LoRA(r=settings.lora_r, alpha=settings.lora_alpha, dropout=0.0),
    )
    module.configure_model()
    module.train()
    causal_lm = module.policy.get_base_model()
    batch = our_batch(settings, causal_lm.config.vocab_size)
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # what precision="bf16-mixed" does on CPU

    memory = PeakMemory()
    memory.start()
    timer = StepTimer(0)
    ref_times = []
    for _ in range(settings.warmup + 1):  # the first call pays one-off kernel set-up, like the first step
        timer.start()
        with autocast():
            refs = module.reference_logps(batch)
        timer.stop()
        ref_times.append(timer.times.pop())
    batch.update({k: v for k, v in refs.items() if v is not None})

    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    sections = Sections(causal_lm, settings.warmup)
    timer = StepTimer(settings.warmup)
    for i in range(settings.warmup + settings.steps):
        timer.start()
        sections.begin()
        with autocast():
            loss = module.training_step(batch, i)
        sections.mark("forward: loss + rest")
        loss.backward()
        sections.mark("backward")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        sections.mark("optimizer")
        timer.stop()
        sections.end()
    return {
        "side": "ours",
        "step_s": timer.median,
        "step_times_s": timer.timed,
        "step_cpu_s": timer.cpu_median,
        "warmup_s": timer.times[: settings.warmup],
        "ref_s": ref_times[-1],
        "ref_first_s": ref_times[0],
        "sections_s": sections.medians(),
        "trainable_params": module.count_parameters()["trainable"],
        **memory.report(),
    }
