"""Never lose a run: a killed, damaged or diverging run resumes to the uninterrupted result, or stops
with a message, and nothing already written is lost."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import cli, cli_popen, fixture_recipe, write_recipe
from lora_sdpo.rundir import verify_files

FINAL = ("step-1/adapter/adapter_model.safetensors", "step-2/adapter/adapter_model.safetensors", "step-2/model/model.safetensors")


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())  # parses: it is whole after every kill


def _assert_same_result(out: Path, ref: Path, atol: float = 0.0):
    """Adapters and M_2 equal to the uninterrupted run. On the CPU the resumed computation is the
    same sequence of float operations, so they are bit-equal (atol 0); the tolerance is kept as a
    parameter for kills outside the named points, which land mid-phase and redo it whole."""
    for rel in FINAL:
        ours, theirs = load_file(out / rel), load_file(ref / rel)
        assert ours.keys() == theirs.keys()
        for k in ours:
            assert ours[k].dtype == theirs[k].dtype, (rel, k)
            assert torch.allclose(ours[k].float(), theirs[k].float(), atol=atol, rtol=0), (rel, k)
    a, b = _manifest(out), _manifest(ref)
    for sa, sb in zip(a["steps"], b["steps"]):
        for key in ("first_loss", "last_loss", "reward_accuracy", "gamma_ref_mean"):
            assert abs(sa[key] - sb[key]) <= max(atol, 1e-7), (sa["index"], key, sa[key], sb[key])
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


def test_killed_at_each_phase_resumes_to_the_uninterrupted_result(tmp_path, data_dir, two_step_run):
    """SIGKILL (LORA_SDPO_FAULT) in training after a checkpoint, inside the write of M_1, between the
    steps, right after step 2's reference pass and inside the write of M_2; then run to the end."""
    recipe = write_recipe(tmp_path, data_dir)  # the fixture run's recipe
    out = tmp_path / "run"

    def killed_at(point: str) -> subprocess.CompletedProcess:
        proc = cli("run", str(recipe), "--output", str(out), check=False, env={"LORA_SDPO_FAULT": point})
        assert proc.returncode == -signal.SIGKILL, (point, proc.returncode, proc.stderr[-3000:])
        return proc

    killed_at("step1:train:2")
    m = _manifest(out)
    assert m["steps"][0]["status"] == "running" and m["steps"][0]["phase"] == "train"
    assert (out / "step-1/trainer/checkpoint-2/lora-sdpo-complete.json").exists()
    assert not (out / "step-1/adapter").exists()

    proc = killed_at("step1:merge")  # inside the M_1 write, after its shard
    assert "resuming the interrupted step (its train phase)" in proc.stdout
    m = _manifest(out)
    assert m["steps"][0]["phase"] == "merge" and m["steps"][0]["resumed"] == ["train from checkpoint-2"]
    assert verify_files(out / "step-1/adapter", m["steps"][0]["adapter_files"]) is None
    assert not (out / "step-1/model").exists() and list((out / "step-1").glob("model.tmp-*"))
    metrics = (out / "step-1/metrics.jsonl").read_text()

    proc = killed_at("step1:done")
    assert "its merge phase" in proc.stdout
    assert (out / "step-1/metrics.jsonl").read_text() == metrics  # training was not redone

    proc = killed_at("step2:reference")
    assert "step 1/2: done earlier, skipped" in proc.stdout
    assert (out / "step-2/data/hf_cache").is_dir() and not (out / "step-2/data/ref_logps.safetensors").exists()

    m1_hashes = _manifest(out)["steps"][0]["model_files"]
    killed_at("step2:merge")  # the fault-injection test: a crash in the middle of writing M_2
    m = _manifest(out)
    assert m["steps"][0]["status"] == "done" and verify_files(out / "step-1/model", m1_hashes) is None
    assert m["steps"][1]["phase"] == "merge" and not (out / "step-2/model").exists()

    proc = cli("run", str(recipe), "--output", str(out))
    assert "step 2/2: resuming the interrupted step (its merge phase)" in proc.stdout
    assert [s["status"] for s in _manifest(out)["steps"]] == ["done", "done"]
    assert not (out / "step-1/trainer").exists()  # checkpoints go once A_t is saved
    _assert_same_result(out, two_step_run)


def test_a_kill_in_each_phase_resumes_that_phase_only(tmp_path, data_dir, two_step_run):
    """Step 1 of a one-step run killed in each of its phases in turn (the record's `phase` decides
    what a resume runs; the phases before it are read back, not redone), then run to the end: A_1,
    M_1, the losses and the retention equal the uninterrupted run's step 1, bit for bit."""
    recipe = write_recipe(tmp_path, data_dir, steps=("orca.jsonl",))
    out = tmp_path / "run"
    ref_logps, metrics = out / "step-1/data/ref_logps.safetensors", out / "step-1/metrics.jsonl"
    adapter, model = out / "step-1/adapter/adapter_model.safetensors", out / "step-1/model/model.safetensors"

    def killed_at(point: str, resumes: str | None) -> dict:
        proc = cli("run", str(recipe), "--output", str(out), check=False, env={"LORA_SDPO_FAULT": point})
        assert proc.returncode == -signal.SIGKILL, (point, proc.returncode, proc.stderr[-3000:])
        if resumes:
            assert f"resuming the interrupted step (its {resumes} phase)" in proc.stdout, (point, proc.stdout[-2000:])
        return _manifest(out)["steps"][0]

    rec = killed_at("step1:reference", None)  # reference log-probs computed, not yet saved
    assert rec["phase"] == "reference" and not ref_logps.exists()
    rec = killed_at("step1:adapter", "reference")  # A_1 saved, the record not yet written
    assert rec["phase"] == "train" and adapter.exists() and "adapter_files" not in rec
    seen = {p: p.stat().st_mtime_ns for p in (ref_logps,)}

    def updates() -> list[str]:  # the optimizer updates' records (the summary line is TRL's per call of train)
        return [line for line in metrics.read_text().splitlines() if "train_runtime" not in line]

    trained = updates()
    assert len(trained) == 3
    rec = killed_at("step1:retention", "train")  # retention measured, not yet recorded
    assert {p: p.stat().st_mtime_ns for p in seen} == seen  # the reference pass was read back, not redone
    assert updates() == trained and rec["resumed"] == ["train from checkpoint-3"]  # no update trained again
    assert rec["phase"] == "retention" and "retention_detail" not in rec
    seen = {p: p.stat().st_mtime_ns for p in (ref_logps, adapter, model)}
    rec = killed_at("step1:diagnostics", "retention")  # gamma rows computed, the step not yet done
    assert {p: p.stat().st_mtime_ns for p in seen} == seen  # neither A_1 nor M_1 written again
    assert rec["phase"] == "diagnostics" and rec["retention_detail"]["sample"] == 8
    proc = cli("run", str(recipe), "--output", str(out))
    assert "resuming the interrupted step (its diagnostics phase)" in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in seen} == seen
    m = _manifest(out)
    done, ref = m["steps"][0], _manifest(two_step_run)["steps"][0]
    assert done["status"] == "done" and "phase" not in done and done["retention_detail"] == rec["retention_detail"]
    assert set(m["gamma_matrix"]["rows"]) == {"S", "M_1"}
    for key in ("first_loss", "last_loss", "reward_accuracy", "gamma_ref_mean", "retention_detail", "tokens"):
        assert done[key] == ref[key], key
    for rel in ("step-1/adapter/adapter_model.safetensors", "step-1/model/model.safetensors"):
        a, b = load_file(out / rel), load_file(two_step_run / rel)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel


def test_the_record_phase_decides_and_the_hashes_verify(tmp_path, two_step_run):
    """The phase table: a resumed step starts at the phase its record names, unless what an earlier
    phase wrote no longer matches the record's sha256; then it starts at that earlier phase."""
    from types import SimpleNamespace

    from lora_sdpo import manifest
    from lora_sdpo.rundir import RunDir
    from lora_sdpo.step import PHASES, READ_BACK, VERIFY, StepContext, StepRun, first_phase

    assert list(PHASES) == ["reference", "train", "merge", "retention", "diagnostics"]
    assert set(READ_BACK) == set(VERIFY) == set(PHASES) - {"diagnostics"}
    out = tmp_path / "run"
    shutil.copytree(two_step_run, out)
    run = RunDir(out)
    done = manifest.read(run).step(2)
    assert set(done.reference_files) == {"pairs.jsonl", "ref_logps.safetensors"}
    ctx = StepContext(run=run, base_dir=out, tokenizer=None, samples={}, gamma_max_length=128, gamma_prefix_sharing=True)

    def start(phase: str) -> str:
        record = done.model_copy(update={"status": "running", "phase": phase})
        return first_phase(StepRun(ctx, SimpleNamespace(index=2, target_init="previous"), None, record))

    assert [start(p) for p in PHASES] == list(PHASES)
    _damage_m2(out)
    assert start("diagnostics") == start("retention") == "merge" and start("merge") == "merge"
    (out / "step-2/adapter/adapter_config.json").write_text("{}")
    assert start("diagnostics") == "train"
    (out / "step-2/data/ref_logps.safetensors").unlink()
    assert start("diagnostics") == start("train") == "reference"


def _damage_m2(out: Path) -> None:
    f = out / "step-2/model/model.safetensors"
    data = bytearray(f.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte in M_2
    f.write_bytes(bytes(data))


def test_killed_at_a_random_moment_in_step_2(tmp_path, data_dir, two_step_run):
    """A kill from outside, at whatever point step 2 has reached 3 s after it started.

    It starts from a copy of the shared run with M_2 damaged: the run verifies step 1, removes
    step 2 and starts it again from nothing (the state a first run is in when step 1 is done), so
    step 1 is not trained again here."""
    out = tmp_path / "run"
    shutil.copytree(two_step_run, out)
    _damage_m2(out)
    recipe = fixture_recipe(tmp_path, data_dir, two_step_run.parent / "eval.jsonl")  # the shared run's recipe
    proc = cli_popen("run", str(recipe), "--output", str(out), output=False)
    deadline = time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None:
            m = json.loads((out / "manifest.json").read_text())["steps"][1]
            if m.get("status") == "running":
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run finished before it could be interrupted"
        time.sleep(3)
    finally:
        proc.kill()
        proc.wait()
    assert _manifest(out)["steps"][0]["status"] == "done"
    step1_model = load_file(out / "step-1/model/model.safetensors")
    proc = cli("run", str(recipe), "--output", str(out))
    assert "step 1/2: done earlier, skipped" in proc.stdout
    after = load_file(out / "step-1/model/model.safetensors")
    assert all(torch.equal(v, after[k]) for k, v in step1_model.items())
    _assert_same_result(out, two_step_run)


def test_a_damaged_finished_step_is_redone(tmp_path, data_dir, two_step_run):
    out = tmp_path / "run"
    shutil.copytree(two_step_run, out)
    _damage_m2(out)
    proc = cli("run", str(fixture_recipe(tmp_path, data_dir, two_step_run.parent / "eval.jsonl")), "--output", str(out))
    assert "step 1/2: done earlier, skipped (files verified" in proc.stdout
    assert "step-2/model/model.safetensors does not match the manifest's sha256" in proc.stdout
    assert "redoing step 2" in proc.stdout
    _assert_same_result(out, two_step_run)


def test_resume_refuses_a_changed_recipe_and_says_what_changed(tmp_path, data_dir, two_step_run):
    out = tmp_path / "run"
    shutil.copytree(two_step_run, out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    held_out = two_step_run.parent / "eval.jsonl"
    recipe = fixture_recipe(tmp_path, data_dir, held_out, extra="\n[data]\nmax_bad_fraction = 0.02\n")
    proc = cli("run", str(recipe), "--output", str(out), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "holds a run of a different recipe (changed: recipe.data.max_bad_fraction: 0.01 -> 0.02)" in proc.stderr
    assert "--restart" in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    # a comment is not a change
    plain = fixture_recipe(tmp_path, data_dir, held_out)
    plain.write_text("# a comment\n" + plain.read_text())
    assert "done earlier, skipped" in cli("run", str(plain), "--output", str(out)).stdout


def test_restart_starts_over_and_changed_data_is_refused(tmp_path, data_dir, two_step_run):
    out = tmp_path / "run"
    shutil.copytree(two_step_run, out)
    (out / "step-2").joinpath("stale.txt").write_text("x")
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    recipe = write_recipe(tmp_path, data, steps=("orca.jsonl",))
    cli("run", str(recipe), "--output", str(out), "--restart")
    m = _manifest(out)
    assert [s["status"] for s in m["steps"]] == ["done"] and not (out / "step-2").exists()
    rows = (data / "orca.jsonl").read_text().splitlines()
    (data / "orca.jsonl").write_text("\n".join(rows[1:]) + "\n")
    proc = cli("run", str(recipe), "--output", str(out), check=False)
    n = m["steps"][0]["rows"]
    assert proc.returncode == 2 and f"the data of step 1 changed since it ran ({n} -> {n - 1} pairs" in proc.stderr
    assert "--restart" in proc.stderr and "Traceback" not in proc.stderr


def test_a_nan_loss_stops_the_step_with_a_message(tmp_path, data_dir):
    recipe = write_recipe(tmp_path, data_dir, steps=("orca.jsonl",))
    out = tmp_path / "run"
    proc = cli("run", str(recipe), "--output", str(out), "--set", "training.learning_rate=1e6", "--set", "training.max_grad_norm=1e9", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    err = proc.stderr
    assert "step 1: the gradient norm became nan at optimizer step 2" in err
    assert "checkpoint-1, is kept" in err and "learning_rate = 1e+06" in err and "fp16" in err
    m = _manifest(out)
    assert m["steps"][0]["status"] == "failed" and "optimizer step 2" in m["steps"][0]["error"]
    assert not (out / "step-1/adapter").exists() and not (out / "step-1/model").exists()
    assert sorted(p.name for p in (out / "step-1/trainer").glob("checkpoint-*")) == ["checkpoint-1"]


def test_too_little_disk_for_m_t_stops_before_training(tmp_path, data_dir, monkeypatch):
    from click.testing import CliRunner

    from lora_sdpo import rundir
    from lora_sdpo.cli import main

    real = shutil.disk_usage

    def tiny(path):
        u = real(path)
        return u._replace(free=5_000_000) if str(path).startswith(str(tmp_path)) else u

    monkeypatch.setattr(rundir.shutil, "disk_usage", tiny)
    recipe = write_recipe(tmp_path, data_dir, steps=("orca.jsonl",))
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["run", str(recipe), "--output", str(out)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "step 1: writing M_1 (float32) needs 0.02 GB" in result.output and "only 0.01 GB is free" in result.output
    assert not (out / "step-1/trainer").exists()  # stopped before training, not after it
    assert _manifest(out)["steps"][0]["status"] == "failed"


def test_length_grouped_order_comes_from_seed_and_epoch():
    from lora_sdpo.trl_compat import EpochSeededLengthGroupedSampler

    g = torch.Generator().manual_seed(0)
    lengths = [int(x) for x in torch.randint(5, 500, (64,), generator=g)]
    torch.manual_seed(0)
    first = list(EpochSeededLengthGroupedSampler(8, lengths, seed=3))
    torch.manual_seed(123)  # the global RNG, where a resumed run stands elsewhere, plays no part
    sampler = EpochSeededLengthGroupedSampler(8, lengths, seed=3)
    assert list(sampler) == first and sorted(first) == list(range(64))
    sampler.set_epoch(1)
    assert list(sampler) != first

    def padded(order):
        return sum(8 * max(lengths[i] for i in order[k:k + 8]) - sum(lengths[i] for i in order[k:k + 8]) for k in range(0, 64, 8))

    assert padded(first) < 0.6 * padded(torch.randperm(64, generator=g).tolist())


def test_a_length_grouped_run_resumes_exactly(tmp_path, data_dir):
    """Killed in its second epoch (optimizer step 4 of 6), a length-grouped step resumes bit-equal."""
    recipe = write_recipe(tmp_path, data_dir, steps=("orca.jsonl",))
    sets = ["--set", "training.group_by_length=true", "--set", "training.num_train_epochs=2"]
    cli("run", str(recipe), "--output", str(tmp_path / "a"), *sets)
    proc = cli("run", str(recipe), "--output", str(tmp_path / "b"), *sets, check=False, env={"LORA_SDPO_FAULT": "step1:train:4"})
    assert proc.returncode == -signal.SIGKILL
    cli("run", str(recipe), "--output", str(tmp_path / "b"), *sets)
    assert _manifest(tmp_path / "b")["steps"][0]["resumed"] == ["train from checkpoint-4"]
    for rel in ("step-1/adapter/adapter_model.safetensors", "step-1/model/model.safetensors"):
        a, b = load_file(tmp_path / "a" / rel), load_file(tmp_path / "b" / rel)
        assert all(torch.equal(a[k], b[k]) for k in a), rel
