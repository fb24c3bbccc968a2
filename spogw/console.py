"""A calm console: spogw's own progress bars on the screen; libraries' bars, logs and warnings in the run's log.

:func:`quiet_libraries` routes Python logging and warnings to ``<run_dir>/spogw.log`` and turns off the
progress bars of transformers, huggingface_hub and datasets (through their environment variables, so the
`spogw fit` subprocess and the engine's server inherit it). :func:`stage_bar` is the one bar a stage shows
(counts, rate, ETA). The fit's bar is fed by :class:`spogw.progress.ProgressFile` in the `spogw fit` subprocess
(``step total`` in ``$SPOGW_PROGRESS_FILE``), which :func:`read_progress` reads.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' "Loading weights" bars, the GGUF conversion's, the hub's
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_SILENT": "true",
}


def quiet_libraries(log_file: str | Path) -> Path:
    """Send logging and warnings to ``log_file`` (appended) and silence the libraries' own bars. Idempotent."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    path = Path(log_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    if not any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path.resolve() for h in root.handlers):
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(min(root.level or logging.INFO, logging.INFO))
    logging.captureWarnings(True)
    for name in ("transformers", "datasets", "huggingface_hub", "lightning", "lightning.pytorch"):
        lib = logging.getLogger(name)
        lib.propagate = True
        for h in list(lib.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                lib.removeHandler(h)
    return path


def stage_bar(desc: str, unit: str):
    """``(bar, update)``: a tqdm bar on stderr and ``update(done, total)`` for it."""
    from tqdm.auto import tqdm

    bar = tqdm(total=0, desc=desc, unit=unit, dynamic_ncols=True, mininterval=1.0, file=sys.stderr)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    return bar, update


def read_progress(path: Path) -> tuple[int, int] | None:
    """The fit's last ``(step, total)``, None before it wrote one."""
    try:
        step, total = Path(path).read_text().split()
        return int(step), int(total)
    except (OSError, ValueError):
        return None
