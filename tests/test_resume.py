"""A resumed run equals an uninterrupted one: kill a real `lora-sdpo run` and run it again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from conftest import cli, write_recipe


def _run_until(recipe, out, predicate, timeout=600):
    proc = subprocess.Popen(
        [sys.executable, "-m", "lora_sdpo", "run", str(recipe), "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"},
    )
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            m = out / "manifest.json"
            if m.exists() and predicate(json.loads(m.read_text())):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run finished before it could be interrupted"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_killed_in_step_2_resumes_to_the_same_result(tmp_path, data_dir, two_step_run):
    recipe = write_recipe(tmp_path, data_dir)  # the same recipe as the uninterrupted fixture run
    out = tmp_path / "run"
    _run_until(recipe, out, lambda m: m["steps"][1].get("status") == "running")
    time.sleep(3)  # somewhere inside step 2 (loading, reference pass or training)
    m = json.loads((out / "manifest.json").read_text())
    assert m["steps"][0]["status"] == "done" and m["steps"][1]["status"] == "running"
    step1_model = load_file(out / "step-1" / "model" / "model.safetensors")

    proc = cli("run", str(recipe), "--output", str(out))
    assert "step 1/2: done earlier, skipped" in proc.stdout
    m = json.loads((out / "manifest.json").read_text())
    assert [s["status"] for s in m["steps"]] == ["done", "done"]
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    # step 1 was not touched, step 2 equals the uninterrupted run's
    assert all(torch.equal(v, load_file(out / "step-1" / "model" / "model.safetensors")[k]) for k, v in step1_model.items())
    for rel in ("step-2/adapter/adapter_model.safetensors", "step-2/model/model.safetensors"):
        ours, ref = load_file(out / rel), load_file(two_step_run / rel)
        assert ours.keys() == ref.keys()
        for k in ours:
            assert torch.allclose(ours[k].float(), ref[k].float(), atol=1e-6, rtol=0), (rel, k)
    ref_m = json.loads((two_step_run / "manifest.json").read_text())
    assert abs(m["steps"][1]["last_loss"] - ref_m["steps"][1]["last_loss"]) < 1e-6


def test_resume_refuses_a_changed_recipe(tmp_path, data_dir, two_step_run):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(two_step_run, out)
    recipe = write_recipe(tmp_path, data_dir, extra="\n[data]\nmax_bad_fraction = 0.02\n")
    proc = cli("run", str(recipe), "--output", str(out), check=False)
    assert proc.returncode == 2 and "holds a run of a different recipe" in proc.stderr and "--restart" in proc.stderr
    assert "Traceback" not in proc.stderr
