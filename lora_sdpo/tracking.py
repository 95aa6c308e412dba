"""Experiment tracking (`[run] report_to`): each sDPO step is a tracked run of its own, grouped under the run.

    tensorboard  RUN/step-N/tensorboard: TRL's per-update metrics (transformers' TensorBoardCallback,
                 keys train/...), then lora-sdpo's step-end scalars (lora_sdpo/...). `tensorboard
                 --logdir RUN` shows one run per step.
    mlflow       experiment = run.name, one MLflow run per step named NAME/step-N and tagged with the
                 run directory; MLFLOW_TRACKING_URI when set, else RUN/mlflow.db (sqlite). transformers'
                 MLflowCallback logs into the run opened here.

Only the main process tracks (the others are given no tracker). A resumed step continues its own
tracked run: TensorBoard purges the points after the checkpoint it resumes from (SummaryWriter's
purge_step), MLflow reopens the run whose id RUN/step-N/tracking.json keeps (MLflow keeps every point
it was sent, so the updates between that checkpoint and the kill appear twice there). Tokens: the
trackers receive TrainingArguments.to_dict(), where transformers masks every *_token value, and
lora-sdpo never puts HF_TOKEN into the arguments.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

from .errors import RecipeError
from .manifest import StepRecord
from .rundir import RunDir, atomic_write_json

EXTRA = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow")}  # name: (module, extra)


def require(recipe) -> None:
    """Every tracker the recipe names is installed; checked before the run directory is touched."""
    missing = [n for n in recipe.recipe.run.report_to if importlib.util.find_spec(EXTRA[n][0]) is None]
    if "mlflow" in recipe.recipe.run.report_to and "mlflow" not in missing and importlib.util.find_spec("sqlalchemy") is None:
        missing.append("mlflow")
    if missing:
        raise RecipeError(
            f"{recipe.path}: run.report_to names {', '.join(missing)}, not installed here: "
            + " ".join(f"pip install 'lora-sdpo[{EXTRA[n][1]}]'" for n in missing)
            + " (or remove it from run.report_to)"
        )


def run_name(recipe, index: int) -> str:
    return f"{recipe.recipe.run.name}/step-{index}"


def mlflow_uri(run: RunDir) -> str:
    import logging
    import os

    import mlflow  # noqa: F401  (configures its loggers at import; quieted after it)

    # MLflow and Alembic announce the creation of a new store's tables at INFO on stderr.
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run.root / 'mlflow.db'}"


class StepTracking:
    """The trackers of one step: the trainer callbacks, and lora-sdpo's own scalars at the step's end."""

    def __init__(self, recipe, run: RunDir, index: int):
        self.recipe, self.run, self.index = recipe, run, index
        self.names = list(recipe.recipe.run.report_to)
        self.state_path = run.step(index) / "tracking.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        self._mlflow_run = None

    @property
    def tensorboard_dir(self) -> Path:
        return self.run.step(self.index) / "tensorboard"

    def trainer_callbacks(self, resume_step: int) -> list:
        """Callbacks for the step's trainer; a resume from optimizer step `resume_step` continues the tracked run."""
        callbacks = []
        if "tensorboard" in self.names:
            from torch.utils.tensorboard import SummaryWriter
            from transformers.integrations import TensorBoardCallback

            # TensorBoard drops the points at or after purge_step that an earlier event file holds.
            writer = SummaryWriter(log_dir=str(self.tensorboard_dir), purge_step=resume_step + 1 if resume_step else None)
            callbacks.append(TensorBoardCallback(tb_writer=writer))
        if "mlflow" in self.names:
            import mlflow
            from transformers.integrations import MLflowCallback

            run_id = self._mlflow_run_id()
            mlflow.set_tracking_uri(mlflow_uri(self.run))
            # MLflowCallback logs into the active run instead of starting its own.
            self._mlflow_run = mlflow.start_run(run_id=run_id)
            callbacks.append(MLflowCallback())
        return callbacks

    def _mlflow_run_id(self) -> str:
        from mlflow.tracking import MlflowClient

        if "mlflow_run_id" in self.state:
            return self.state["mlflow_run_id"]
        client = MlflowClient(mlflow_uri(self.run))
        name = self.recipe.recipe.run.name
        exp = client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(name)
        r = client.create_run(exp_id, run_name=run_name(self.recipe, self.index),
                              tags={"lora_sdpo.run_dir": str(self.run.root), "lora_sdpo.step": str(self.index)})
        self.state["mlflow_run_id"] = r.info.run_id
        atomic_write_json(self.state_path, self.state)
        return r.info.run_id

    def end_training(self) -> None:
        if self._mlflow_run is not None:
            import mlflow

            mlflow.end_run()
            self._mlflow_run = None

    def log_step_end(self, record: StepRecord, matrix_rows: dict) -> None:
        """lora-sdpo's own scalars of the finished step, at its last optimizer step."""
        if not self.names:
            return
        scalars = step_scalars(record, matrix_rows)
        step = int(record.optimizer_steps or 0)
        if "tensorboard" in self.names:
            from torch.utils.tensorboard import SummaryWriter

            with SummaryWriter(log_dir=str(self.tensorboard_dir)) as w:
                for k, v in scalars.items():
                    w.add_scalar(k, v, step)
        if "mlflow" in self.names:
            from mlflow.entities import Metric
            from mlflow.tracking import MlflowClient

            client = MlflowClient(mlflow_uri(self.run))
            now = int(time.time() * 1000)
            run_id = self._mlflow_run_id()
            client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in scalars.items()])
            client.set_terminated(run_id)


def step_scalars(record: StepRecord, matrix_rows: dict) -> dict[str, float]:
    """rows, first loss, gamma_ref, retention with its noise, and the step's gamma-matrix row."""
    ret = record.retention_detail
    values = {
        "lora_sdpo/rows": record.rows,
        "lora_sdpo/first_loss": record.first_loss,
        "lora_sdpo/gamma_ref_mean": record.gamma_ref_mean,
        "lora_sdpo/gamma_ref_std": record.gamma_ref_std,
    }
    if ret is not None:
        values |= {
            "lora_sdpo/retention": ret.retention,
            "lora_sdpo/retention_gain": ret.gain,
            "lora_sdpo/retention_noise": ret.noise,
            "lora_sdpo/retention_reliable": float(ret.reliable) if "reliable" in ret.model_fields_set else None,
        }
    for model, row in matrix_rows.items():
        for data, st in row.items():
            values[f"lora_sdpo/gamma/{model}/{data}"] = (st or {}).get("mean")
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float))}
