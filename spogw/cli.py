"""`spogw`: the command line.

``spogw fit --config X.yaml`` is a LightningCLI over :class:`~spogw.module.SPOGWModule` and
:class:`~spogw.data.GroupDataModule`: every option is a typed, documented flag
(``spogw fit --help``), and the resolved config is written to ``<run_dir>/config.yaml`` so that
``spogw fit --config <run_dir>/config.yaml`` reproduces the run. The other stages are their own
subcommands (:data:`COMMANDS`: sample, score, build, iterate, evaluate, sweep, report), each a plain function
whose typed signature and docstring jsonargparse turns into flags.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Literal

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from spogw.data import GroupDataModule
from spogw.module import SPOGWModule
from spogw.tracking import Tracking, resolve_trainer_config

TRAINER_DEFAULTS = {
    "default_root_dir": "runs/default",
    "max_epochs": 1,
    "log_every_n_steps": 1,
    "num_sanity_val_steps": 0,
    "gradient_clip_val": 1.0,
}

# Stage subcommands other than `fit`: name -> ("module:function", one-line help). Each function is
# also the stage's plain Python API; jsonargparse turns its typed signature and docstring into flags.
COMMANDS: dict[str, tuple[str, str]] = {
    "sample": ("spogw.sampling:sample_stage", "the generator writes m workflows per query (resumable JSONL)"),
    "score": ("spogw.scoring:score_stage", "run every sampled workflow r times with the executor and score it"),
    "build": ("spogw.cli:build", "build the group-wise dataset from scored samples"),
    "iterate": ("spogw.loop:iterate", "run K ioGRPO iterations: sample -> score -> build -> fit, then evaluate"),
    "evaluate": ("spogw.evaluate:evaluate", "solve rates of the generator and the static baselines (Table 1)"),
    "sweep": ("spogw.sweep:sweep", "run a W&B sweep YAML's grid locally, one `spogw fit` per point (resumable)"),
    "report": ("spogw.report:report", "figures (paper Figs. 2-3) and a summary table of a run or sweep directory"),
}
# Commands whose first argument may be given without its flag.
POSITIONAL = {"sweep": "--sweep_file", "report": "--run_dir"}

OVERVIEW = """usage: spogw <command> [options]

commands:
  fit      train the generator's LoRA adapter with ioGRPO-mKL (LightningCLI: spogw fit --help)
{commands}

typical use:
  spogw iterate --config configs/quickstart.yaml     # the whole loop on a CPU, offline (embedded SmolLM2-135M)
  spogw iterate --config configs/humaneval.yaml      # the paper's loop (GPU, OpenAI-compatible executor)
  spogw fit --config configs/fit/quickstart.yaml     # the fit stage alone, on a shipped scored-samples file
  spogw fit --config runs/fit-quickstart/config.yaml # reproduce a run from its saved config
  spogw evaluate --config configs/evaluate_quickstart.yaml
"""


class RunConfigCallback(SaveConfigCallback):
    """Also writes the resolved config to ``<default_root_dir>/config.yaml``, next to the run's artifacts."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        path = Path(trainer.default_root_dir) / self.config_filename
        path.parent.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, str(path), skip_none=False, overwrite=True, multifile=False)


class SPOGWCLI(LightningCLI):
    """LightningCLI with the model name shared by the tokenizer and config errors reported as usage errors."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # Only `fit`: the objective has no validation/test/predict step; evaluation is its own stage.
        return {"fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.model", "data.tokenizer")
        parser.add_lightning_class_args(Tracking, "tracking")  # dataset stats, tables, artifacts (W&B)

    def _instantiate_trainer(self, config: dict, callbacks: list) -> L.Trainer:
        # No --trainer.logger: a CSV copy in the run dir + W&B; a run dir per `wandb agent` run (spogw.tracking).
        warn_emulated_bf16(config)
        return super()._instantiate_trainer(resolve_trainer_config(config), callbacks)

    def before_fit(self) -> None:
        # Build the dataset in the launching process, before DDP starts its other ranks: bad data
        # then stops one process with a message instead of leaving ranks waiting at a barrier.
        if int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0:
            if self.datamodule.run_dir is None:
                self.datamodule.run_dir = self.trainer.default_root_dir
            self.datamodule.prepare_data()

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError) as e:
            self.parser.error(str(e))


def warn_emulated_bf16(trainer_config: dict) -> bool:
    """bf16 precision on a CPU that only emulates it (no AMX / AVX-512 bf16) is many times slower than
    float32: say so, with the flag that fixes it. Returns whether it warned."""
    from spogw.engine.options import native_bf16

    precision, accelerator = str(trainer_config.get("precision")), str(trainer_config.get("accelerator", "auto"))
    if not precision.startswith("bf16") or accelerator not in ("cpu", "auto") or native_bf16():
        return False
    warnings.warn(f"`--trainer.precision {precision}` on a CPU without AMX or AVX-512 bf16: bf16 is emulated here, "
                  "many times slower than float32; pass `--trainer.precision 32-true`", stacklevel=2)
    return True


def run_fit(args: list[str] | None = None, run: bool = True) -> SPOGWCLI:
    """Run ``spogw fit`` (or another LightningCLI subcommand) and return the CLI object (for tests, notebooks)."""
    from jsonargparse import set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    return SPOGWCLI(
        SPOGWModule,
        GroupDataModule,
        save_config_callback=RunConfigCallback,
        save_config_kwargs={"overwrite": True},
        trainer_defaults=TRAINER_DEFAULTS,
        seed_everything_default=0,
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )


def build(
    scored_samples: str,
    out_dir: str,
    n: int = 14,
    t: int = 4,
    top_n: int = 100,
    m: int | None = None,
    seed: int = 0,
    mode: Literal["screen_sharpen", "screen", "random_filter", "random"] = "screen_sharpen",
    scope: Literal["global", "per_query"] = "global",
    dedup: bool = True,
    failed_score: float | None = 0.0,
    on_bad_record: Literal["error", "skip"] = "error",
) -> dict:
    """Build the group-wise dataset (Arrow + stats.json) from a scored-samples JSONL file.

    Args:
        scored_samples: JSONL with query_id, prompt, completion, score per line.
        out_dir: directory to write the dataset into (replaced atomically).
        n: instance size before sharpening.
        t: keep the bottom t and top t of each instance.
        top_n: number of groups to keep (dataset size d).
        m: samples per query, if known (checks n <= m).
        seed: tie-break seed.
        mode: screen_sharpen | screen | random_filter | random.
        scope: global | per_query.
        dedup: rank distinct sharpened groups.
        failed_score: score of failed (invalid, crashed, timed out, empty) workflows; null drops them.
        on_bad_record: error | skip.
    """
    from spogw.data import Curation, build_dataset

    curation = Curation(n=n, t=t, top_n=top_n, m=m, seed=seed, mode=mode, scope=scope, dedup=dedup,
                        failed_score=failed_score)
    stats = build_dataset(scored_samples, out_dir, curation, on_bad_record=on_bad_record)
    print(f"{stats['groups']} groups from {stats['records']} records of {stats['queries']} queries -> {out_dir}")
    return stats


def cli_main(args: list[str] | None = None) -> None:
    """Entry point of the `spogw` console script (returns nothing: its value would become the exit status)."""
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] in ("-h", "--help"):
        print(OVERVIEW.format(commands="\n".join(f"  {name:<8} {text}" for name, (_, text) in COMMANDS.items())))
        return
    if argv[0] in COMMANDS:
        import importlib

        from spogw.console import QUIET_ENV

        for key, value in QUIET_ENV.items():  # the libraries' own bars and advice stay off the console
            os.environ.setdefault(key, value)
        from jsonargparse import CLI, set_parsing_settings

        set_parsing_settings(docstring_parse_attribute_docstrings=True)  # dataclass field docs become --help text
        module, func = COMMANDS[argv[0]][0].split(":")
        if argv[0] in POSITIONAL and len(argv) > 1 and not argv[1].startswith("-"):
            argv.insert(1, POSITIONAL[argv[0]])  # `spogw report runs/x` = `spogw report --run_dir runs/x`
        try:
            CLI(getattr(importlib.import_module(module), func), args=argv[1:], as_positional=False,
                prog=f"spogw {argv[0]}")
        except (ValueError, FileNotFoundError) as e:  # includes DataError: bad options or data
            print(f"spogw {argv[0]}: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from spogw.data import DataError

    try:
        run_fit(args)  # None: LightningCLI reads sys.argv itself
    except DataError as e:  # bad input data: a message, not a traceback
        print(f"spogw {argv[0]}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    cli_main()
