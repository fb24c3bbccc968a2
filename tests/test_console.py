"""The calm console: warnings and library logs go to the run's log, the libraries' bars are off, and the fit's
progress reaches the loop's bar through a file written by a real Lightning callback."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

from spogw.console import read_progress


def test_warnings_and_library_logs_go_to_the_run_log_not_the_console(tmp_path):
    code = textwrap.dedent(f"""
        import logging, os, sys, warnings
        from spogw.console import quiet_libraries
        quiet_libraries({str(tmp_path / "run" / "spogw.log")!r})
        warnings.warn("a library's advice")
        logging.getLogger("transformers.modeling_utils").warning("a library's warning")
        print(os.environ["HF_HUB_DISABLE_PROGRESS_BARS"], os.environ["TRANSFORMERS_VERBOSITY"])
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "error"]  # inherited by the fit subprocess and the engine's server
    assert "advice" not in done.stderr and "warning" not in done.stderr
    log = (tmp_path / "run" / "spogw.log").read_text()
    assert "a library's advice" in log and "a library's warning" in log


def test_the_fit_callback_writes_its_step_and_total(tmp_path, monkeypatch):
    import lightning as L
    import torch

    from spogw.progress import ProgressFile

    path = tmp_path / "progress.txt"
    monkeypatch.setenv("SPOGW_PROGRESS_FILE", str(path))
    seen = []

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            seen.append(read_progress(path))
            return self.w(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(5, 2)), batch_size=1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    L.Trainer(max_epochs=1, callbacks=[ProgressFile()], logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path).fit(Tiny(), data)
    assert seen == [(0, 5), (1, 5), (2, 5), (3, 5), (4, 5)] and read_progress(path) == (5, 5)
    assert read_progress(tmp_path / "nowhere") is None
