"""Experiment tracking and settings per step, on one tiny real two-step run through the CLI.

Step 2 trains with its own learning rate, beta, loss (ipo) and epochs, so its first loss is
(1/(2 beta))^2 = 4 instead of ln 2: the trainer's logs, every tracker's records and the manifest
must all show step 2's settings. Step 2 is killed after its first update's checkpoint and resumed,
and each tracker must still hold one run per step with each update once (W&B and Trackio write in
batches, so the killed process's last update may be missing there, never doubled). Each tracker is read back
from its local files: tensorboard's EventAccumulator, MLflow's client, W&B's offline run files
(RUN/wandb/offline-run-*/run-ID.wandb, read below), Trackio's SQLite database (RUN/trackio/NAME.db).
W&B and Trackio are tracked when installed (extras wandb, trackio; both in the test extra), and
their tests are skipped, saying so, where they are not. Everything stays offline (conftest sets
WANDB_MODE=offline; Trackio is local only).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sqlite3
import struct
from pathlib import Path

import pytest

from conftest import FAKE_TOKEN, cli, write_jsonl, write_recipe

LN2 = math.log(2)
STEP1 = [("What is 2 + 2?", "2 + 2 = 4.", "It is 5."), ("Name a primary colour.", "Red is a primary colour.", "Green, I think."),
         ("Translate 'merci' into English.", "'Merci' means 'thank you'.", "It means 'goodbye'."), ("Is the sun a star?", "Yes, the sun is a star.", "No, it is a planet.")]
STEP2 = [("What is the capital of France?", "Paris.", "Lyon."), ("How many legs has a spider?", "Eight.", "Six."),
         ("What colour is the sky on a clear day?", "Blue.", "Green."), ("Is ice colder than steam?", "Yes.", "No.")]
STEP2_TRAINING = {"learning_rate": 1e-3, "beta": 0.25, "loss_type": "ipo", "num_train_epochs": 2}


OPTIONAL = [n for n in ("wandb", "trackio") if importlib.util.find_spec(n) is not None]
TRACKERS = ["tensorboard", "mlflow", *OPTIONAL]


def _needs(name: str) -> None:
    if name not in OPTIONAL:
        pytest.skip(f"{name} is not installed here (pip install 'lora-sdpo[{name}]')")


def _sets(step2=STEP2_TRAINING) -> list[str]:
    return [f"run.report_to={json.dumps(TRACKERS)}", "retention.sample_size=4"] + [
        f"steps.1.training.{k}={json.dumps(v)}" for k, v in step2.items()]


def _rows(pairs):
    return [{"prompt": q, "chosen": c, "rejected": r} for q, c, r in pairs]


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tracked")
    write_jsonl(folder / "a.jsonl", _rows(STEP1))
    write_jsonl(folder / "b.jsonl", _rows(STEP2))
    recipe = write_recipe(folder, folder, steps=("a.jsonl", "b.jsonl"))
    out = folder / "run"
    args = ("run", str(recipe), "--output", str(out), *[a for s in _sets() for a in ("--set", s)])
    killed = cli(*args, check=False, env={"LORA_SDPO_FAULT": "step2:train:1"})  # after update 1's checkpoint
    assert killed.returncode != 0
    cli(*args)
    return recipe, out


def _scalars(folder: Path) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc, {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}


def test_each_step_trains_with_its_own_settings(tracked_run):
    _, out = tracked_run
    m = json.loads((out / "manifest.json").read_text())
    s1, s2 = m["steps"]
    assert (s1["training"]["learning_rate"], s1["training"]["beta"], s1["training"]["loss_type"]) == (2e-3, 0.1, "sigmoid")
    assert {k: s2["training"][k] for k in STEP2_TRAINING} == STEP2_TRAINING
    assert m["settings"]["step_training"] == [s1["training"], s2["training"]]
    assert (s1["optimizer_steps"], s2["optimizer_steps"]) == (1, 2)  # 4 pairs a batch; step 2: 2 epochs
    assert s2["resumed"] == ["train from checkpoint-1"]
    # the trainer's own logs: learning rate (constant schedule) and the loss at zero margin
    first = [json.loads((out / f"step-{i}" / "metrics.jsonl").read_text().splitlines()[0]) for i in (1, 2)]
    assert first[0]["learning_rate"] == pytest.approx(2e-3) and first[1]["learning_rate"] == pytest.approx(1e-3)
    assert abs(first[0]["loss"] - LN2) < 1e-4
    assert abs(first[1]["loss"] - (1 / (2 * 0.25)) ** 2) < 1e-3  # ipo at beta 0.25: 4, not 25 (beta 0.1)


def test_tensorboard_has_one_folder_per_step_with_trl_and_lora_sdpo_scalars(tracked_run):
    _, out = tracked_run
    assert sorted(p.relative_to(out).as_posix() for p in out.glob("*/tensorboard")) == ["step-1/tensorboard", "step-2/tensorboard"]
    for i, loss, beta in ((1, LN2, 0.1), (2, 4.0, 0.25)):
        acc, sc = _scalars(out / f"step-{i}" / "tensorboard")
        assert [e.step for e in sc["train/loss"]] == list(range(1, i + 1))  # each update once, across the resume
        assert abs(sc["train/loss"][0].value - loss) < 1e-3
        for tag in ("lora_sdpo/rows", "lora_sdpo/first_loss", "lora_sdpo/gamma_ref_mean", "lora_sdpo/retention_noise",
                    f"lora_sdpo/gamma/M_{i}/D_{i}"):
            assert tag in sc, (i, tag, sorted(sc))
        assert sc["lora_sdpo/rows"][0].value == 4
        assert abs(sc["lora_sdpo/first_loss"][0].value - loss) < 1e-3
        args = json.loads(acc.Tensors("args/text_summary")[0].tensor_proto.string_val[0].decode())
        assert args["beta"] == beta and args["run_name"] == f"test/step-{i}"
    assert "lora_sdpo/gamma/S/D_1" in _scalars(out / "step-1" / "tensorboard")[1]


def test_mlflow_has_one_run_per_step_grouped_under_the_run(tracked_run):
    from mlflow.tracking import MlflowClient

    _, out = tracked_run
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("test")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert sorted(runs) == ["test/step-1", "test/step-2"]
    for i, loss, beta in ((1, LN2, 0.1), (2, 4.0, 0.25)):
        r = runs[f"test/step-{i}"]
        history = client.get_metric_history(r.info.run_id, "loss")
        assert [h.step for h in history] == list(range(1, i + 1))  # the resumed step went on in its own run
        assert abs(history[0].value - loss) < 1e-3
        assert float(r.data.params["beta"]) == beta
        assert r.data.metrics["lora_sdpo/rows"] == 4
        assert r.info.status == "FINISHED"


def _wandb_records(path: Path):
    """The records of a W&B run file: a 7-byte header, then LevelDB log blocks of 32 KiB whose
    records (4-byte CRC, 2-byte length, 1-byte type: 1 full, 2 first, 3 middle, 4 last) carry
    wandb_internal.proto Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", path
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record
            buf = b""


def _wandb_runs(out: Path) -> dict[str, dict]:
    """W&B's offline runs under RUN/wandb by name: project, group, config, and history by metric
    ({global step: value}, each point once: a repeated point fails), over every folder of the run's id."""
    runs: dict[str, dict] = {}
    for folder in sorted(out.glob("wandb/offline-run-*")):
        (file,) = folder.glob("run-*.wandb")
        run = None
        for rec in _wandb_records(file):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                run = runs.setdefault(rec.run.display_name, {"ids": set(), "config": {}, "history": {}, "folders": 0})
                run["ids"].add(rec.run.run_id)
                run["folders"] += 1
                run["project"], run["group"] = rec.run.project, rec.run.run_group
                run["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
            elif kind == "config":
                run["config"].update({i.key: json.loads(i.value_json) for i in rec.config.update})
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                for k, v in items.items():
                    if k.startswith(("train/loss", "lora_sdpo/")):
                        points = run["history"].setdefault(k, {})
                        assert items["train/global_step"] not in points, (k, items)
                        points[items["train/global_step"]] = v
    return runs


def test_wandb_offline_has_one_run_per_step_grouped_under_the_run(request):
    _needs("wandb")
    _, out = request.getfixturevalue("tracked_run")
    runs = _wandb_runs(out)
    assert sorted(runs) == ["test/step-1", "test/step-2"]
    # step 1: training, then the step-end scalars; step 2: training (killed), resumed training, the step end
    assert len(list(out.glob("wandb/offline-run-*"))) == 5
    for i, loss, beta in ((1, LN2, 0.1), (2, 4.0, 0.25)):
        r = runs[f"test/step-{i}"]
        assert len(r["ids"]) == 1 and (r["project"], r["group"]) == ("test", "test")  # one id: `wandb sync` joins them
        # Each update at most once across the resume. W&B writes its file every 15 s and at the end, so
        # the killed process's last points may be missing (update 1 of step 2; TensorBoard has it).
        points = r["history"]["train/loss"]
        assert i in points and set(points) <= set(range(1, i + 1))
        if 1 in points:
            assert abs(points[1] - loss) < 1e-3
        assert abs(r["history"]["lora_sdpo/first_loss"][i] - loss) < 1e-3
        assert r["config"]["beta"] == beta and r["config"]["lora_sdpo.training.beta"] == beta
        assert r["config"]["lora_sdpo.run_dir"] == str(out)
        assert r["history"]["lora_sdpo/rows"] == {i: 4}
        assert f"lora_sdpo/gamma/M_{i}/D_{i}" in r["history"]
    assert "lora_sdpo/gamma/S/D_1" in runs["test/step-1"]["history"]


def test_trackio_has_one_local_run_per_step_grouped_under_the_run(request):
    _needs("trackio")
    _, out = request.getfixturevalue("tracked_run")
    with sqlite3.connect(out / "trackio" / "test.db") as db:
        metrics = db.execute("SELECT run_name, step, metrics FROM metrics ORDER BY id").fetchall()
        configs = {name: json.loads(c) for name, c in db.execute("SELECT run_name, config FROM configs")}
    assert sorted(configs) == ["test/step-1", "test/step-2"]
    for i, loss, beta in ((1, LN2, 0.1), (2, 4.0, 0.25)):
        name = f"test/step-{i}"
        points: dict[str, dict] = {}
        for run, step, values in metrics:
            for k, v in json.loads(values).items():
                if run == name and k.startswith(("train/loss", "lora_sdpo/")):
                    assert step not in points.setdefault(k, {}), (name, k, step)  # each point once
                    points[k][step] = v
        # Trackio writes every 0.5 s: the killed process's last point may be missing (update 1 of step 2)
        assert i in points["train/loss"] and set(points["train/loss"]) <= set(range(1, i + 1))
        if 1 in points["train/loss"]:
            assert abs(points["train/loss"][1] - loss) < 1e-3
        assert points["lora_sdpo/rows"] == {i: 4}
        assert abs(points["lora_sdpo/first_loss"][i] - loss) < 1e-3
        assert f"lora_sdpo/gamma/M_{i}/D_{i}" in points
        assert configs[name]["_Group"] == "test" and configs[name]["lora_sdpo.training.beta"] == beta


def test_no_token_reaches_a_tracker(tracked_run):
    _, out = tracked_run
    files = [p for p in out.rglob("*") if p.is_file()
             and ({"tensorboard", "wandb", "trackio"} & set(p.relative_to(out).parts) or p.name.startswith("mlflow"))]
    assert len(files) >= 3 + 3 * ("wandb" in OPTIONAL) + ("trackio" in OPTIONAL)
    for p in files:
        assert FAKE_TOKEN.encode() not in p.read_bytes(), p


def test_resume_compares_each_steps_settings(tracked_run):
    from lora_sdpo.errors import RunError
    from lora_sdpo.recipe import load_recipe
    from lora_sdpo.run import prepare_run_dir

    recipe, out = tracked_run
    with pytest.raises(RunError) as e:
        prepare_run_dir(load_recipe(recipe, _sets({**STEP2_TRAINING, "beta": 0.3})), str(out), restart=False)
    assert "step_training.1.beta: 0.25 -> 0.3" in str(e.value)


def test_plan_report_and_compare_show_the_per_step_settings(tracked_run):
    from lora_sdpo.compare import arm_recipe
    from lora_sdpo.errors import RecipeError
    from lora_sdpo.plan import make_plan
    from lora_sdpo.recipe import load_recipe
    from lora_sdpo.report import build_report

    recipe, out = tracked_run
    loaded = load_recipe(recipe, _sets())
    lines = make_plan(loaded).lines
    assert "loss: sigmoid" in lines
    assert any(line.startswith("  training (this step): ") and "beta=0.25" in line and "loss_type=ipo" in line for line in lines)
    report = build_report(out).read_text()
    assert "## Training settings of each step" in report and "| 2 | ipo | 0.25 | 0.001 |" in report
    # compare: the sDPO arms keep each step's settings; the one-step dpo arm has no honest equivalent
    assert arm_recipe(loaded, "sdpo-strat").recipe.step_training(2).beta == 0.25
    with pytest.raises(RecipeError, match="no honest equivalent"):
        arm_recipe(loaded, "dpo")
    same = load_recipe(recipe, ["steps.0.training.beta=0.2", "steps.1.training.beta=0.2"])
    assert arm_recipe(same, "dpo").recipe.step_training(1).beta == 0.2


def test_a_tracker_that_is_not_installed_is_named_with_its_extra(data_dir, tmp_path, monkeypatch):
    import importlib.util

    from lora_sdpo import tracking
    from lora_sdpo.errors import RecipeError
    from lora_sdpo.recipe import load_recipe

    loaded = load_recipe(write_recipe(tmp_path, data_dir), ['run.report_to=["mlflow"]'])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(RecipeError, match=r"run.report_to names mlflow, not installed here: pip install 'lora-sdpo\[mlflow\]'"):
        tracking.require(loaded)
    for name in ("wandb", "trackio"):
        loaded = load_recipe(write_recipe(tmp_path, data_dir), [f'run.report_to=["{name}"]'])
        monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a, name=name: None if n == name else real(n, *a))
        with pytest.raises(RecipeError, match=rf"run.report_to names {name}, not installed here: pip install 'lora-sdpo\[{name}\]'"):
            tracking.require(loaded)
    with pytest.raises(RecipeError, match="unknown tracker 'wandbb'; did you mean 'wandb'"):
        load_recipe(write_recipe(tmp_path, data_dir), ['run.report_to=["wandbb"]'])


def test_wandb_goes_online_only_with_a_login_and_a_network(monkeypatch, tmp_path):
    from lora_sdpo import tracking

    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert tracking.wandb_mode() == "offline"  # no login
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert tracking.wandb_mode() == "online"  # `wandb login` writes this
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert tracking.wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.wandb_mode() == "disabled"  # the user's word decides


def test_wandb_falls_back_to_offline_when_the_server_cannot_be_reached(data_dir, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from lora_sdpo import tracking
    from lora_sdpo.recipe import load_recipe
    from lora_sdpo.rundir import RunDir

    calls = []

    def init(**kwargs):
        calls.append(kwargs)
        if kwargs["mode"] == "online":
            raise wandb.errors.CommError("Timed out while retrying")
        return "run"

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setattr(tracking, "wandb_mode", lambda: "online")
    monkeypatch.delenv("WANDB_ERROR_REPORTING", raising=False)
    run = RunDir(tmp_path / "run")
    run.step(1).mkdir(parents=True)
    st = tracking.StepTracking(load_recipe(write_recipe(tmp_path, data_dir), ['run.report_to=["wandb"]']), run, 1)
    assert st._open_wandb() == "run"
    assert [c["mode"] for c in calls] == ["online", "offline"]
    assert calls[1]["dir"] == str(run.root) and calls[1]["name"] == "test/step-1" and calls[1]["group"] == "test"
    assert calls[0]["id"] == calls[1]["id"] == json.loads((run.step(1) / "tracking.json").read_text())["wandb_id"]
    assert os.environ["WANDB_ERROR_REPORTING"] == "false"  # offline, nothing is reported either
