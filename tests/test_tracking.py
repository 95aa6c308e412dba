"""Experiment tracking and settings per step, on one tiny real two-step run through the CLI.

Step 2 trains with its own learning rate, beta, loss (ipo) and epochs, so its first loss is
(1/(2 beta))^2 = 4 instead of ln 2: the trainer's logs, TensorBoard's and MLflow's records and the
manifest must all show step 2's settings. Step 2 is killed after its first update's checkpoint and
resumed, and each tracker must still hold one run per step with each update once. Both trackers are
read back with their own readers (tensorboard's EventAccumulator, MLflow's client).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import FAKE_TOKEN, cli, write_jsonl, write_recipe

LN2 = math.log(2)
STEP1 = [("What is 2 + 2?", "2 + 2 = 4.", "It is 5."), ("Name a primary colour.", "Red is a primary colour.", "Green, I think."),
         ("Translate 'merci' into English.", "'Merci' means 'thank you'.", "It means 'goodbye'."), ("Is the sun a star?", "Yes, the sun is a star.", "No, it is a planet.")]
STEP2 = [("What is the capital of France?", "Paris.", "Lyon."), ("How many legs has a spider?", "Eight.", "Six."),
         ("What colour is the sky on a clear day?", "Blue.", "Green."), ("Is ice colder than steam?", "Yes.", "No.")]
STEP2_TRAINING = {"learning_rate": 1e-3, "beta": 0.25, "loss_type": "ipo", "num_train_epochs": 2}


def _sets(step2=STEP2_TRAINING) -> list[str]:
    return ['run.report_to=["tensorboard", "mlflow"]', "retention.sample_size=4"] + [
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


def test_no_token_reaches_a_tracker(tracked_run):
    _, out = tracked_run
    files = [p for p in out.rglob("*") if p.is_file() and ("tensorboard" in p.parts or p.name.startswith("mlflow"))]
    assert len(files) >= 3
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
    with pytest.raises(RecipeError, match="'wandb' is not offered yet"):
        load_recipe(write_recipe(tmp_path, data_dir), ['run.report_to=["wandb"]'])
