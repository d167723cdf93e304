"""Training curves where the field looks at them: TensorBoard, Weights & Biases, MLflow (optional packages).

Every training step writes OUT.metrics.jsonl (kt.progress); `--log tensorboard,wandb,mlflow` sends the same
records to these too. This module is imported only when --log asks for a logger (kt.checks.log_kinds checks
the names); a missing package, or a logger folder that cannot be made, is one line before any work.

A logger mirrors the metrics file, one generation of OUT at a time (kt.progress): a training that starts at
step 0 starts anew (its TensorBoard folder emptied, the runs of earlier generations of OUT deleted), and a
resume whose metrics file dropped lines past the state's step (a kill after the last save) rewinds each logger
to that step too: TensorBoard purges the later events, MLflow and offline W&B replay the kept lines into a
fresh run that replaces the old one. So a redo or a resume shows what one uninterrupted run would.
"""
import contextlib
import fcntl
import glob
import hashlib
import importlib
import os
import shutil
import time

from kt.checks import LOGGERS, fail
from kt.claims import writable_folder

def folders(kinds, out):
    """The folders the loggers of --log write for the training of `out`."""
    where = dict(tensorboard=_tensorboard_dir(out), wandb=os.path.join(_beside(out), "wandb"))
    if "mlflow" in kinds and _mlflow_uri(out).startswith("sqlite:///"):
        where["mlflow"] = os.path.dirname(_mlflow_uri(out)[len("sqlite:///"):]) or "."
    return [where[k] for k in kinds if k in where]


def check_folders(kinds, out):
    """Before any work: every logger folder can be made and written, else one line."""
    for folder in folders(kinds, out):
        writable_folder(folder, "a folder of --log")


def open_loggers(kinds, out, flags, generation, resumed_step, history, rewind):
    """The loggers of --log for generation `generation` of `out` (rank 0 only), starting at `resumed_step`
    (0: afresh). history: the metrics file's records up to resumed_step; rewind: the file dropped later ones
    (a kill after the last save), so each logger goes back to `history` too. A logger that has no run of this
    generation yet (added on a resume) gets `history` first."""
    made = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}
    return [made[k](out, flags, generation, resumed_step, history, rewind) for k in kinds]


def _need(kind):
    try:
        return importlib.import_module("torch.utils.tensorboard" if kind == "tensorboard" else kind)
    except ImportError:
        fail(f"--log {kind} needs the {LOGGERS[kind]} package: pip install {LOGGERS[kind]}")


def _beside(out):
    return os.path.dirname(os.path.abspath(out))


def _out_id(out):
    """A stable id of the output file `out`: what its generations share."""
    return hashlib.sha1(os.path.abspath(out).encode()).hexdigest()[:12]


def _scalars(record):
    return {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _tensorboard_dir(out):
    return os.path.join(_beside(out), "tensorboard", os.path.splitext(os.path.basename(out))[0])


class TensorBoard:
    """Event files in DIR/tensorboard/NAME/ beside OUT (`tensorboard --logdir runs/demo` shows every step's).
    A new generation empties the folder; a resumed run purges the events past its step."""

    def __init__(self, out, flags, generation, resumed_step, history, rewind):
        tb = _need("tensorboard")
        self.dir = _tensorboard_dir(out)
        if not resumed_step:
            shutil.rmtree(self.dir, ignore_errors=True)
        self.writer = tb.SummaryWriter(self.dir, purge_step=resumed_step + 1 if resumed_step else None)

    def log(self, record):
        for k, v in _scalars(record).items():
            self.writer.add_scalar(k, v, record["step"])
        self.writer.flush()

    def close(self):
        self.writer.close()


class WandB:
    """A W&B run per generation (project $WANDB_PROJECT, default vfm-kt), offline unless WANDB_API_KEY or
    WANDB_MODE=online is set: `wandb sync DIR/wandb/offline-run-*` uploads it later. Offline, a new generation
    removes the local runs of the earlier ones, and a rewind replays the kept records into the run afresh;
    online, a rewind uses W&B's own (resume_from=RUN?_step=N), and an earlier generation's run stays on the
    server."""

    def __init__(self, out, flags, generation, resumed_step, history, rewind):
        wandb = _need("wandb")
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        folder, self.id = os.path.join(_beside(out), "wandb"), f"{_out_id(out)}-{generation}"
        offline, replay = mode != "online", False
        if offline:  # W&B keeps a run's local files in DIR/wandb/offline-run-TIME-ID/
            for run in glob.glob(os.path.join(folder, f"offline-run-*-{_out_id(out)}-*")):
                if rewind or not run.endswith(self.id):  # another generation's, or rewound
                    shutil.rmtree(run, ignore_errors=True)
            replay = not glob.glob(os.path.join(folder, f"offline-run-*-{self.id}"))
        where = dict(resume_from=f"{self.id}?_step={resumed_step + 1}") if rewind and not offline else \
            dict(id=self.id, resume="allow")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "vfm-kt"), name=os.path.basename(out),
                              mode=mode, config=flags, dir=_beside(out), **where)
        for record in history if replay else ():
            self.log(record)

    def log(self, record):
        self.run.log(_scalars(record), step=record["step"])

    def close(self):
        self.run.finish()


def _mlflow_uri(out):
    return os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///" + os.path.join(_beside(out), "mlflow.db")


class MLflow:
    """An MLflow run per generation in $MLFLOW_TRACKING_URI (run.sh: OUT/mlflow.db), by default an SQLite file
    DIR/mlflow.db beside OUT (`mlflow ui --backend-store-uri sqlite:///DIR/mlflow.db`), tagged kt_out and
    kt_generation. A new generation deletes (MLflow's soft delete) the runs of the earlier ones; a rewind
    replays the kept records into a new run and deletes the one it replaces (MLflow cannot delete points).
    Every call holds a lock beside an SQLite file: two steps that start together on a new database would
    otherwise both create its tables, and one fail."""

    def __init__(self, out, flags, generation, resumed_step, history, rewind):
        mlflow = _need("mlflow")
        uri = _mlflow_uri(out)
        self.lock_path = uri[len("sqlite:///"):] + ".lock" if uri.startswith("sqlite:///") else None
        tags = dict(kt_out=_out_id(out), kt_generation=generation)
        with self.locked():
            self.client = mlflow.tracking.MlflowClient(uri)
            exp = self.client.get_experiment_by_name("vfm-kt")
            exp_id = exp.experiment_id if exp else self.client.create_experiment("vfm-kt")
            keep = None
            for run in self.client.search_runs([exp_id], f"tags.kt_out = '{tags['kt_out']}'"):
                same = run.data.tags.get("kt_generation") == generation and resumed_step and not rewind
                if same and keep is None:
                    keep = run.info.run_id  # a resume that dropped nothing continues its run
                else:
                    self.client.delete_run(run.info.run_id)
            replay = keep is None
            if replay:
                keep = self.client.create_run(exp_id, tags=tags, run_name=os.path.basename(out)).info.run_id
                for k, v in flags.items():
                    self.client.log_param(keep, k, str(v)[:500])
            self.run_id = keep
        for record in history if replay else ():
            self.log(record)

    @contextlib.contextmanager
    def locked(self):
        if self.lock_path is None:
            yield
            return
        with open(self.lock_path, "a") as f:
            fcntl.lockf(f, fcntl.LOCK_EX)  # the kernel drops it with the process
            try:
                yield
            finally:
                fcntl.lockf(f, fcntl.LOCK_UN)

    def log(self, record):
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        with self.locked():
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, record["step"])
                                                        for k, v in _scalars(record).items()])

    def close(self):
        with self.locked():
            self.client.set_terminated(self.run_id)
