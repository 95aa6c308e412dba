"""Experiment tracking (`[run] report_to`): each sDPO step is a tracked run of its own, grouped under the run.

    tensorboard  RUN/step-N/tensorboard: TRL's per-update metrics (transformers' TensorBoardCallback,
                 keys train/...), then lora-sdpo's step-end scalars (lora_sdpo/...). `tensorboard
                 --logdir RUN` shows one run per step.
    mlflow       experiment = run.name, one MLflow run per step named NAME/step-N and tagged with the
                 run directory; MLFLOW_TRACKING_URI when set, else RUN/mlflow.db (sqlite). transformers'
                 MLflowCallback logs into the run opened here.
    wandb        project = WANDB_PROJECT or run.name, group = run.name, one W&B run per step named
                 NAME/step-N (its id kept in RUN/step-N/tracking.json), written under RUN/wandb.
                 Offline (nothing leaves the machine, `wandb sync RUN/wandb/offline-run-*` uploads
                 later) unless a W&B login is found (WANDB_API_KEY, or ~/.netrc from `wandb login`)
                 and HF_HUB_OFFLINE is unset; WANDB_MODE, when set, decides. An online start that
                 cannot reach the server falls back to offline. Offline, W&B's error reporting is
                 turned off (WANDB_ERROR_REPORTING=false). transformers' WandbCallback logs into the
                 run opened here.
    trackio      local only: TRACKIO_DIR = RUN/trackio (project run.name, group run.name, one run
                 per step named NAME/step-N); `TRACKIO_DIR=RUN/trackio trackio show` opens it.
                 TRACKIO_SPACE_ID and TRACKIO_SERVER_URL are ignored (removed from the process's
                 environment), so nothing goes to a Space or server.

Only the main process tracks (the others are given no tracker). A resumed step continues its own
tracked run: TensorBoard purges the points after the checkpoint it resumes from (SummaryWriter's
purge_step), MLflow and W&B reopen the run whose id RUN/step-N/tracking.json keeps and Trackio the run
of the step's name (they keep every point they were sent, so the updates between that checkpoint and
the kill appear twice there). W&B and Trackio runs are closed after training and reopened for the
step-end scalars, which carry the step's settings (StepRecord.training) as the run's config; offline,
each opening is a folder RUN/wandb/offline-run-*-ID, and `wandb sync` uploads the folders of one id
in order as one run. W&B writes that file every 15 s and Trackio its database every 0.5 s (and both
when a run finishes), so a process killed outright (SIGKILL, OOM) loses its last points there;
metrics.jsonl, TensorBoard and MLflow keep them.
Tokens: the trackers receive TrainingArguments.to_dict(), where transformers masks every *_token
value, and lora-sdpo never puts HF_TOKEN into the arguments.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from .errors import RecipeError, RunError
from .manifest import StepRecord
from .rundir import RunDir, atomic_write_json

EXTRA = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb"),
         "trackio": ("trackio", "trackio")}  # name: (module, extra)


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


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def wandb_logged_in() -> bool:
    """A W&B login is configured: an API key or identity token in the environment, or a netrc entry for its host."""
    import netrc

    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode() -> str:
    """WANDB_MODE when set; online with a login and no HF_HUB_OFFLINE; otherwise offline."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if wandb_logged_in() and not _truthy("HF_HUB_OFFLINE") else "offline"


def trackio_dir(run: RunDir) -> Path:
    return run.root / "trackio"


def import_trackio(run: RunDir):
    """trackio, local under RUN/trackio. It reads TRACKIO_DIR once, at import: a process tracks one run directory."""
    for var in ("TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL"):  # local only: no Space, no server
        os.environ.pop(var, None)
    want = str(trackio_dir(run))
    if "trackio" in sys.modules and os.environ.get("TRACKIO_DIR") != want:
        raise RunError(f"trackio already writes to {os.environ.get('TRACKIO_DIR')} in this process and cannot move to {want} "
                       "(it reads TRACKIO_DIR once); run each run directory in its own process, or track with another of "
                       "run.report_to")
    os.environ["TRACKIO_DIR"] = want
    import trackio

    return trackio


def trackio_callback(trackio):
    """A trainer callback that sends the trainer's logs to the Trackio run lora-sdpo opened (transformers'
    TrackioCallback opens its own, in TrainingArguments.project, and can push to a Space)."""
    from transformers import TrainerCallback

    class TrackioLog(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                trackio.config.update(args.to_dict())  # to_dict masks every *_token value

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                trackio.log({f"train/{k}": v for k, v in logs.items() if isinstance(v, (int, float))}, step=state.global_step)

    return TrackioLog()


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
        if "wandb" in self.names:
            from transformers.integrations import WandbCallback

            self._open_wandb()  # WandbCallback logs into the active run instead of starting its own
            callbacks.append(WandbCallback())
        if "trackio" in self.names:
            callbacks.append(trackio_callback(self._open_trackio()))
        return callbacks

    def _open_wandb(self, config: dict | None = None):
        import wandb

        if "wandb_id" not in self.state:
            self.state["wandb_id"] = secrets.token_hex(4)
            atomic_write_json(self.state_path, self.state)
        name = self.recipe.recipe.run.name
        kwargs = dict(project=os.environ.get("WANDB_PROJECT") or name, group=name, name=run_name(self.recipe, self.index),
                      id=self.state["wandb_id"], resume="allow", dir=str(self.run.root), job_type="sdpo-step",
                      config={"lora_sdpo.run_dir": str(self.run.root), "lora_sdpo.step": self.index, **(config or {})},
                      settings=wandb.Settings(console="off"))  # lora-sdpo's own log has the console
        mode = wandb_mode()
        if mode != "online":
            os.environ["WANDB_ERROR_REPORTING"] = "false"  # offline: W&B's error reports stay here too
        try:
            return wandb.init(mode=mode, **kwargs)
        except wandb.errors.CommError as e:  # online, and the server cannot be reached
            print(f"W&B: cannot reach the server ({str(e).splitlines()[0]}); tracking offline under "
                  f"{self.run.root / 'wandb'} (upload later with `wandb sync`)", file=sys.stderr)
            os.environ["WANDB_ERROR_REPORTING"] = "false"
            return wandb.init(mode="offline", **kwargs)

    def _open_trackio(self, config: dict | None = None):
        trackio = import_trackio(self.run)
        name = self.recipe.recipe.run.name
        trackio.init(project=name, name=run_name(self.recipe, self.index), group=name, resume="allow",
                     config={"lora_sdpo.run_dir": str(self.run.root), "lora_sdpo.step": self.index, **(config or {})},
                     auto_log_cpu=False, auto_log_gpu=False)
        return trackio

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
        if "wandb" in self.names:
            import wandb

            wandb.finish()
        if "trackio" in self.names:
            import trackio

            trackio.finish()

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
        settings = {f"lora_sdpo.training.{k}": v for k, v in (record.training or {}).items()}
        if "wandb" in self.names:
            import wandb

            w = self._open_wandb(settings)
            w.define_metric("train/global_step")
            w.define_metric("*", step_metric="train/global_step", step_sync=True)  # as WandbCallback does
            w.log({**scalars, "train/global_step": step})
            w.finish()
        if "trackio" in self.names:
            trackio = self._open_trackio(settings)
            trackio.log(scalars, step=step)
            trackio.finish()


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
