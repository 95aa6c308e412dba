"""manifest.json through its records (lora_sdpo/manifest.py): every key a run writes is declared,
and a manifest of an unknown format or with a wrongly typed key is refused with one message."""

from __future__ import annotations

import json

import pytest

from conftest import cli_here
from lora_sdpo.manifest import FORMAT, Manifest, StepRecord


def test_every_key_the_shared_run_wrote_is_a_declared_field(two_step_run):
    data = json.loads((two_step_run / "manifest.json").read_text())
    m = Manifest.model_validate(data)
    assert m.format == FORMAT and m.status == "done" and [s.index for s in m.steps] == [1, 2]
    assert set(data) <= set(Manifest.model_fields), set(data) - set(Manifest.model_fields)
    for s in data["steps"]:
        assert set(s) <= set(StepRecord.model_fields), set(s) - set(StepRecord.model_fields)
    assert m.steps[0].rows == data["steps"][0]["rows"] and m.steps[1].model_files == data["steps"][1]["model_files"]


def _run_dir(tmp_path, **changes):
    steps = [{"index": 1, "status": "done", "rows": 4}]
    manifest = {"format": FORMAT, "status": "done", "recipe_sha256": "0" * 64, "steps": steps, **changes}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "recipe.toml").write_text("")
    return tmp_path


@pytest.mark.parametrize("changes,message", [
    ({"format": FORMAT + 1}, f"manifest format {FORMAT + 1}, written by a newer lora-sdpo"),
    ({"steps": [{"index": 1, "status": "done", "rows": "many"}]}, "steps.0.rows"),
    ({"steps": [{"index": 1, "status": "finished"}]}, "steps.0.status"),
])
def test_a_manifest_lora_sdpo_cannot_read_is_refused_naming_the_file(tmp_path, changes, message):
    run = _run_dir(tmp_path, **changes)
    before = (run / "manifest.json").read_bytes()
    proc = cli_here("report", str(run), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"error: {run / 'manifest.json'}: ") and message in proc.stderr, proc.stderr
    assert (run / "manifest.json").read_bytes() == before and not (run / "report.md").exists()
