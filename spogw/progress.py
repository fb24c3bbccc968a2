"""The fit's side of the loop's progress bar: a Lightning callback writing ``step total`` to a file.

`spogw iterate` runs each fit as a subprocess whose output goes to ``<fit_dir>/fit.log``; it passes
``--trainer.callbacks+=spogw.progress.ProgressFile`` and ``$SPOGW_PROGRESS_FILE``, and reads the file to show
one bar for the stage (:func:`spogw.console.read_progress`).
"""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class ProgressFile(Callback):
    """Writes ``<global step> <total steps>`` to ``$SPOGW_PROGRESS_FILE`` after every training batch."""

    def _write(self, trainer) -> None:
        path = os.environ.get("SPOGW_PROGRESS_FILE")
        if not path:
            return
        total = trainer.estimated_stepping_batches
        total = int(total) if total != float("inf") else 0
        tmp = f"{path}.tmp"
        Path(tmp).write_text(f"{trainer.global_step} {total}\n")
        os.replace(tmp, path)

    def on_train_start(self, trainer, pl_module) -> None:
        self._write(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._write(trainer)
