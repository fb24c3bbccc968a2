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

from _common import MODEL, Clock, PeakMemory, Settings, fixed_batch, report_step, wait_for_go
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


def run_ours(settings: Settings, *, gradient_checkpointing: bool = False) -> dict:
    import torch

    from spogw.module import LoRA, SPOGWModule

    logging.getLogger("lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer attached: logging is a no-op
    module = SPOGWModule(
        model=MODEL, beta=settings.beta, lr=settings.lr,
        lora=LoRA(r=settings.lora_r, alpha=settings.lora_alpha, dropout=0.0),
        gradient_checkpointing=gradient_checkpointing,
    )
    module.configure_model()
    module.train()
    causal_lm = module.policy.get_base_model()
    batch = our_batch(settings, causal_lm.config.vocab_size)
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # what precision="bf16-mixed" does on CPU

    memory = PeakMemory()
    memory.start()
    with autocast():  # the batch's old/ref log-probs, once, as an iteration's first epoch does
        batch.update({k: v for k, v in module.reference_logps(batch).items() if v is not None})

    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    sections = Sections(causal_lm)
    i = 0
    while wait_for_go():
        # The one-off pass is timed in every round too, so it gets a median; its result is dropped.
        with Clock() as ref, autocast():
            module.reference_logps(batch)
        with Clock() as step:
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
        report_step(step_s=step.wall, cpu_s=step.cpu, ref_s=ref.wall, sections=sections.end())
        i += 1
    return {
        "side": "ours-gc" if gradient_checkpointing else "ours",
        "trainable_params": module.count_parameters()["trainable"],
        **memory.report(),
    }
