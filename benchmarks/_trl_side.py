"""The TRL side of ``train_step.py``: real ``trl.GRPOTrainer`` steps on a fixed batch, generation not timed.

How generation is taken out: ``GRPOTrainer(rollout_func=...)`` is TRL's own hook for custom
rollouts. Ours returns the fixed prompt/completion ids instead of sampling; everything after it in
``_generate_and_score_completions`` runs as in a real step (decoding, the reference forward with the
LoRA adapter disabled because beta > 0, rewards through a reward function, group advantages), then
``compute_loss`` (policy forward with the fused LM head, entropies, clipped ratio, k3 KL), backward,
gradient clipping and the AdamW step. A step is timed from ``on_step_begin`` to ``on_step_end``
(both callbacks of the transformers Trainer loop), which covers all of that and nothing of logging.
"""

from __future__ import annotations

import contextlib
import tempfile

from _common import MODEL, Clock, PeakMemory, Settings, fixed_batch, lora_config, report_step, wait_for_go


def run_trl(settings: Settings, *, gradient_checkpointing: bool = True) -> dict:
    """Time TRL's step; ``gradient_checkpointing=True`` is GRPOConfig's default."""
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from spogw.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(MODEL)
    model = load_causal_lm(MODEL)  # float32 weights; bf16 comes from autocast (GRPOConfig.bf16)

    prompt, completions, rewards = fixed_batch(settings, model.config.vocab_size)
    reward_of = {tuple(c.tolist()): float(r) for c, r in zip(completions, rewards, strict=True)}

    def rollout(prompts: list, trainer) -> dict:
        # One prompt, repeated `group` times by TRL's RepeatSampler; hand back the fixed group.
        assert len(prompts) == settings.group, f"expected {settings.group} prompts, got {len(prompts)}"
        return {
            "prompt_ids": [prompt.tolist() for _ in prompts],
            "completion_ids": [c.tolist() for c in completions],
            "logprobs": None,  # only read for vLLM importance sampling, which is off
        }

    def fixed_reward(prompts, completions, completion_ids, **kwargs) -> list[float]:
        return [reward_of[tuple(ids)] for ids in completion_ids]

    clock = Clock()

    class StopTraining(Exception):
        """Raised at the start of a step the parent does not want: ends ``trainer.train()`` cleanly enough."""

    class TimeSteps(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if not wait_for_go():
                raise StopTraining
            clock.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            clock.__exit__()
            report_step(step_s=clock.wall, cpu_s=clock.cpu)

    max_steps = 1000  # the parent ends training much earlier, through StopTraining
    dataset = Dataset.from_dict({"prompt": ["fixed prompt"] * 8})
    with tempfile.TemporaryDirectory(prefix="bench-trl-") as out:
        args = GRPOConfig(
            output_dir=out,
            per_device_train_batch_size=settings.group,
            num_generations=settings.group,
            max_completion_length=settings.completion_len,
            beta=settings.beta,
            loss_type="grpo",  # 1/|y_i| per sequence, as in the paper's objective
            learning_rate=settings.lr,
            max_steps=max_steps,
            bf16=True,
            gradient_checkpointing=gradient_checkpointing,
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            logging_steps=max_steps,  # logging is outside the timed span anyway; keep stdout quiet
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=settings.seed,
        )
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=[fixed_reward],
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora_config(settings),
            rollout_func=rollout,
            callbacks=[TimeSteps()],
        )
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        memory = PeakMemory()
        memory.start()
        with contextlib.suppress(StopTraining):
            trainer.train()
    return {
        "side": "trl" if gradient_checkpointing else "trl-nogc",
        "gradient_checkpointing": gradient_checkpointing,
        "version": f"trl {trl.__version__}",
        "trainable_params": trainable,
        **memory.report(),
    }
