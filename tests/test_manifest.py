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


def test_a_manifest_read_and_written_back_is_unchanged(two_step_run, tmp_path):
    """The records keep exactly the keys that were set: what a module reads and writes back holds
    what the file held (the `updated` stamp aside), nothing dropped and no default added."""
    from lora_sdpo import manifest

    copy = tmp_path / "run"
    copy.mkdir()
    (copy / "manifest.json").write_text((two_step_run / "manifest.json").read_text())
    m = manifest.read(copy)
    manifest.write(copy, m)
    before = json.loads((two_step_run / "manifest.json").read_text())
    after = json.loads((copy / "manifest.json").read_text())
    assert after.pop("updated") >= before.pop("updated")
    assert after == before


def test_the_resume_decision_follows_the_record(two_step_run, tmp_path):
    """decide: a done step whose files verify is skipped; a damaged one is redone; an interrupted one
    resumed from its phase; other data refused by name."""
    import shutil

    from lora_sdpo import manifest
    from lora_sdpo.errors import RunError
    from lora_sdpo.rundir import RunDir

    run = RunDir(tmp_path / "run")
    shutil.copytree(two_step_run / "step-1" / "adapter", run.adapter_dir(1))
    shutil.copy(two_step_run / "manifest.json", tmp_path / "run" / "manifest.json")
    m = manifest.read(run)
    m.step(1).model = None  # as if pruned: only the adapter is verified
    fp = m.step(1).data_fingerprint
    assert manifest.decide(run, m, 1, fp, m.step(1).rows).action == "skip"
    (run.adapter_dir(1) / "adapter_config.json").write_text("{}")
    d = manifest.decide(run, m, 1, fp, m.step(1).rows)
    assert d.action == "redo" and "adapter_config.json" in d.reason
    m.step(2).status, m.step(2).phase = "running", "merge"
    assert manifest.decide(run, m, 2, m.step(2).data_fingerprint, 1) == manifest.Decision("resume", "merge")
    with pytest.raises(RunError, match="the data of step 2 changed since it ran"):
        manifest.decide(run, m, 2, "0" * 64, 1)
