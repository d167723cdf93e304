"""Training curves where the field looks at them: TensorBoard, Weights & Biases, MLflow (optional packages).

Every training step writes OUT.metrics.jsonl (kt.progress); `--log tensorboard,wandb,mlflow` sends the same
records to these too. Each logger is imported only when asked for; a missing package is one line naming its
pip command, before any work. A resumed run continues the same run of each logger from the resumed step.
"""
import argparse
import hashlib
import importlib
import importlib.util
import os
import time

from kt.checks import fail

PACKAGES = dict(tensorboard="tensorboard", wandb="wandb", mlflow="mlflow")  # --log NAME: pip install PACKAGE


def log_kinds(s):
    """argparse type of --log: a comma list of tensorboard, wandb, mlflow (or none), each installed."""
    kinds = [k for k in s.split(",") if k and k != "none"]
    unknown = [k for k in kinds if k not in PACKAGES]
    if unknown:
        raise argparse.ArgumentTypeError(f"{','.join(unknown)}: --log takes a comma list of {', '.join(PACKAGES)}")
    missing = [PACKAGES[k] for k in kinds if importlib.util.find_spec(PACKAGES[k]) is None]
    if missing:
        raise argparse.ArgumentTypeError(f"--log {s} needs {' and '.join(missing)}: pip install {' '.join(missing)}")
    return kinds


def open_loggers(kinds, out, flags, resumed_step):
    """The loggers of --log for the training of `out` (rank 0 only), resumed at `resumed_step`."""
    made = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}
    return [made[k](out, flags, resumed_step) for k in kinds]


def _need(kind):
    try:
        return importlib.import_module("torch.utils.tensorboard" if kind == "tensorboard" else kind)
    except ImportError:
        fail(f"--log {kind} needs the {PACKAGES[kind]} package: pip install {PACKAGES[kind]}")


def _run_id(out):
    """A stable id for the training of `out`: a resumed run continues the same logger run."""
    return hashlib.sha1(os.path.abspath(out).encode()).hexdigest()[:16]


def _scalars(record):
    return {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoard:
    """Event files in DIR/tensorboard/NAME/ beside OUT (`tensorboard --logdir runs/demo` shows every step's).
    A resumed run purges the events past its step, as the metrics file drops its lines."""

    def __init__(self, out, flags, resumed_step):
        tb = _need("tensorboard")
        name = os.path.splitext(os.path.basename(out))[0]
        self.dir = os.path.join(os.path.dirname(os.path.abspath(out)), "tensorboard", name)
        self.writer = tb.SummaryWriter(self.dir, purge_step=resumed_step + 1 if resumed_step else None)

    def log(self, record):
        for k, v in _scalars(record).items():
            self.writer.add_scalar(k, v, record["step"])
        self.writer.flush()

    def close(self):
        self.writer.close()


class WandB:
    """A W&B run (project $WANDB_PROJECT, default vfm-kt), offline unless WANDB_API_KEY or WANDB_MODE=online
    is set: `wandb sync DIR/wandb/offline-run-*` uploads it later."""

    def __init__(self, out, flags, resumed_step):
        wandb = _need("wandb")
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "vfm-kt"), name=os.path.basename(out),
                              id=_run_id(out), resume="allow", mode=mode, config=flags,
                              dir=os.path.dirname(os.path.abspath(out)))

    def log(self, record):
        self.run.log(_scalars(record), step=record["step"])

    def close(self):
        self.run.finish()


class MLflow:
    """An MLflow run in $MLFLOW_TRACKING_URI (run.sh: OUT/mlflow.db), by default an SQLite file DIR/mlflow.db
    beside OUT (`mlflow ui --backend-store-uri sqlite:///DIR/mlflow.db`); a resumed run continues its run."""

    def __init__(self, out, flags, resumed_step):
        mlflow = _need("mlflow")
        uri = os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///" + os.path.join(
            os.path.dirname(os.path.abspath(out)), "mlflow.db")
        self.client = mlflow.tracking.MlflowClient(uri)
        exp = self.client.get_experiment_by_name("vfm-kt")
        exp_id = exp.experiment_id if exp else self.client.create_experiment("vfm-kt")
        found = self.client.search_runs([exp_id], f"tags.kt_run = '{_run_id(out)}'")
        if found:
            self.run_id = found[0].info.run_id
        else:
            run = self.client.create_run(exp_id, tags={"kt_run": _run_id(out)}, run_name=os.path.basename(out))
            self.run_id = run.info.run_id
            for k, v in flags.items():
                self.client.log_param(self.run_id, k, str(v)[:500])

    def log(self, record):
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, record["step"])
                                                    for k, v in _scalars(record).items()])

    def close(self):
        self.client.set_terminated(self.run_id)
