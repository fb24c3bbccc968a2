"""The analysis notebook runs top to bottom on a real (small) run directory."""

from __future__ import annotations

import json

from conftest import REPO

from spogw.cli import run_fit


def test_inspect_notebook_runs_on_a_run_dir(tmp_path, tiny_model, scored_file, monkeypatch, capsys):
    run = tmp_path / "run"
    run_fit(["fit", "--model.model", tiny_model, "--data.scored_samples", str(scored_file),
             "--data.curation.n", "6", "--data.curation.t", "2", "--data.curation.top_n", "4",
             "--trainer.default_root_dir", str(run), "--trainer.max_steps", "2",
             "--trainer.enable_progress_bar", "false", "--model.lora.r", "4"])
    notebook = json.loads((REPO / "notebooks" / "inspect_run.ipynb").read_text())
    code = [("".join(c["source"])) for c in notebook["cells"] if c["cell_type"] == "code"]
    assert code
    monkeypatch.setenv("SPOGW_RUN_DIR", str(run))
    namespace: dict = {}
    for source in code:
        exec(compile(source, "inspect_run.ipynb", "exec"), namespace)  # noqa: S102 - our own notebook
    out = capsys.readouterr().out
    assert "--- best (score" in out and "--- worst (score" in out
    assert len(namespace["groups"]) == 4 and len(namespace["curves"]) == 2
