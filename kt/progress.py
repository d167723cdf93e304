"""Resumable training: the training of one output file, saved to OUT.state and resumed from it, its loss
read once per interval and logged (stderr, OUT.metrics.jsonl, and TensorBoard / W&B / MLflow with --log),
stopped cleanly on a NaN loss or a signal. A step's loop calls progress.update(loss, images) after each
optimizer step and progress.save_output(checkpoint) at the end.

One training is one generation of OUT (kt.claims.new_generation): a training that starts at step 0 starts
its metrics file and logger runs anew, a resume continues its generation and drops from each what lies past
the resumed step. Every metrics line and the output's cost entry carry the generation, so no reader takes
another training's curves for this one's.
"""
import json
import math
import os
import random
import signal
import time

import numpy as np
import torch

from kt.checkpoints import atomic_write, differences, digest, load_checkpoint, plain, save_checkpoint
from kt.checks import fail, first_line
from kt.claims import new_generation, release
from kt.training import bar, log, unwrap

STATE_FORMAT = 4  # the layout of a resumable state; a state of another format is not resumed
NOT_RESUMED = ("resume", "save_every", "workers", "out", "data_root", "compile", "log", "log_every")  # a resume may change


def run_config(args, **inputs):
    """What a resumable state must match: the state format, the step's flags (but NOT_RESUMED) and the
    contents of its input files (`inputs`: name -> path; compared by sha1)."""
    flags = {f"--{k.replace('_', '-')}": v for k, v in plain(args).items() if k not in NOT_RESUMED}
    return {"state format": STATE_FORMAT, **flags, **{f"the content of {k}": digest(p) for k, p in inputs.items()}}


def rng_state():
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return dict(python=random.getstate(), numpy=[keys.tolist(), pos, has_gauss, gauss],
                torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_state(s):
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in s["python"]))
    keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(s["torch"])
    if s["cuda"]:  # CUDA only
        torch.cuda.set_rng_state_all(s["cuda"])


class Progress:
    """The training of one output file `out`: resume, log, stop on NaN, save states, stop cleanly on a signal.

    update() adds each step's loss on the device. Every `log_every` steps it reads the mean loss once and
    logs it, with measure()'s numbers (a held-out loss), to stderr, OUT.metrics.jsonl and the loggers of
    `log` (kt.loggers; rank 0); log_every=0: about 20 logs a run. Every `save_every` steps, after an epoch of `per_epoch` steps (at most once a minute), at the end or
    on Ctrl-C, SIGTERM or SIGHUP it also saves the state (weights, optimizer, scaler, RNG, step, `config`) to
    OUT.state, with `extra`'s state_dict() where given (finetune.py's guard: its measures). resume() continues
    from a state only if its config matches, and the metrics file from the same step. Under torchrun the ranks
    decide together every `agree_every` steps (one all-reduce), so all of them stop at the same step.
    save_output() writes `out`, then drops the state.
    """

    def __init__(self, out, *, model, optimizer, scaler, total, config=None, save_every=500, log_every=0,
                 per_epoch=0, rank=0, measure=None, log=(), agree_every=20, extra=None):
        self.out, self.path, self.model, self.opt, self.scaler = out, out + ".state", model, optimizer, scaler
        self.total, self.config, self.per_epoch, self.rank = total, config or {}, per_epoch, rank
        auto = min(50, max(1, total // 20))  # 0: about 20 logs a run, at least one every 50 steps
        self.save_every, self.log_every = save_every, min(log_every or auto, save_every)
        self.measure, self.measured = measure, {}  # measure(): more numbers for the log, e.g. a held-out loss
        self.extra = extra  # more to save and resume: state_dict() and load_state_dict(), rank 0's
        self.metrics, self.log_to, self.loggers = out + ".metrics.jsonl", log, []  # log: TensorBoard, W&B, MLflow
        self.world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        self.agree_every = math.gcd(agree_every, self.log_every) if self.world > 1 else 1  # logs on its grid
        self.step, self.images, self.wall, self.loss = 0, 0, 0.0, float("nan")
        self.generation = None  # this training's id (rank 0): new at step 0, a resumed state's own otherwise

    def resume(self):
        """Continue from OUT.state, if there is one, of this same run (another run's is one line)."""
        if not os.path.exists(self.path):
            return
        state = load_checkpoint(self.path, kinds=("resume",))
        differ = differences(state["config"], self.config)
        if differ:
            fail(f"{self.path} is the state of another run ({', '.join(differ[:4])}); rerun that run's "
                 "command, or delete the state to start this one afresh")
        try:
            unwrap(self.model).load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
            if self.extra is not None:
                self.extra.load_state_dict(state["extra"])
        except (RuntimeError, ValueError, KeyError) as e:
            fail(f"{self.path} does not fit this model ({first_line(e)}); delete it to start afresh")
        set_rng_state(state["rng"])
        self.step, self.images, self.wall = state["step"], state["images"], state["wall_s"]
        self.generation = state["generation"]
        log(self.rank, f"resuming {self.path} at step {self.step}/{self.total}")

    def __enter__(self):
        self.stop, self.t0, self.running, self.count = False, time.time() - self.wall, 0.0, 0
        self.saved, self.saved_step, self.logged = time.time(), self.step, (self.step, self.images, time.time())
        if self.rank == 0:
            self._start_side_files()
            if self.step == 0 and self.measure:  # where the curve starts: the held-out loss before training
                self._record(dict(step=0, images=0, **self.measure(), wall_s=0.0))
        self.old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        self.bar = bar(total=self.total, initial=self.step, rank=self.rank, unit="step", leave=False)
        return self

    def _start_side_files(self):
        """The metrics file and the loggers of this generation: afresh at step 0 (a redo into the same OUT
        keeps nothing of the earlier training); on a resume, the lines of the steps it starts from and no
        later ones (a kill's), and each logger rewound to them."""
        found = read_metrics(self.metrics)
        if self.step == 0:
            self.generation, kept = new_generation(), []
        else:
            kept = [r for r in found if r["step"] <= self.step and r.get("generation") == self.generation]
        write_metrics(self.metrics, kept)
        if self.log_to:
            from kt.loggers import open_loggers
            self.loggers = open_loggers(self.log_to, self.out, self.config, self.generation, self.step, kept,
                                        rewind=self.step > 0 and len(kept) < len(found))

    def _on_signal(self, signum, frame):
        self.stop = True  # finish the current step, then save and exit

    def __exit__(self, *exc):
        self.bar.close()
        for s, h in self.old.items():
            signal.signal(s, h)

    @property
    def done(self):
        return self.step >= self.total

    def update(self, loss, images):
        """After each optimizer step: its loss (a device tensor, not read here) and how many images it saw."""
        self.step, self.images, self.count = self.step + 1, self.images + images, self.count + 1
        self.running = self.running + loss.detach().float()
        self.bar.update()  # rate and time left; no tensor is read here
        if self.step % self.agree_every and not self.done:
            return  # torchrun: ranks decide only together
        running, count, log_now, save, stop = self._decide()
        if log_now or save or stop:  # the mean loss since the last read: the one host-device sync per interval
            self.loss, self.running, self.count = float(running / count), 0.0, 0
            self._check_finite()  # (a save reads it too: never a NaN state, and a resumed run logs the same)
        if log_now or stop:
            self._log()
        if save or stop:
            self._save_state()
        if stop:
            fail(f"interrupted at step {self.step}: saved {self.path}; rerun with --resume to continue")

    def _decide(self):
        """Whether to log now (every log_every steps, and at the end), to save (every save_every steps, after
        an epoch, at the end) and to stop (a signal on any rank); under torchrun the one collective per
        agree_every steps sums these, and the losses, over the ranks."""
        since = self.step - self.saved_step
        epoch = self.per_epoch and since >= self.per_epoch and time.time() - self.saved > 60
        save = since >= self.save_every or epoch or self.done
        log_now = self.step % self.log_every == 0 or self.done
        if self.world == 1:
            return self.running, self.count, log_now, save, self.stop
        device = self.running.device
        v = torch.stack([self.running, *(torch.tensor(float(f), device=device)
                                         for f in (self.count, self.stop, save, log_now))])
        torch.distributed.all_reduce(v)
        running, count, stop, save, log_now = v.tolist()  # the host waits here, every agree_every steps
        self.stop = stop > 0
        return running, count, log_now > 0, save > 0, self.stop

    def _check_finite(self):
        """A NaN or infinite loss stops the step, keeping the last good state."""
        if not math.isfinite(self.loss):
            kept = f"the last good state is {self.path}" if os.path.exists(self.path) else "no state was saved"
            fail(f"loss is {self.loss} at step {self.step}; {kept}; lower --lr")

    def _log(self):
        """One log (rank 0): a line on stderr, a line of OUT.metrics.jsonl, the same values to the loggers."""
        _, images0, t0 = self.logged
        now, self.logged = time.time(), (self.step, self.images, time.time())
        if self.rank:
            return
        self.measured = self.measure() if self.measure else {}
        record = dict(step=self.step, epoch=round(self.step / self.per_epoch, 3) if self.per_epoch else None,
                      images=self.images, loss=self.loss, lr=max(g["lr"] for g in self.opt.param_groups),
                      **self.measured, images_per_s=round((self.images - images0) / max(now - t0, 1e-9), 1),
                      wall_s=round(now - self.t0, 2))
        self._record(record)
        self.bar.set_postfix(loss=f"{self.loss:.4f}", **{k: f"{v:.4f}" for k, v in self.measured.items()}, refresh=False)
        more = "".join(f" {k.replace('_', ' ')} {v:.4f}" for k, v in self.measured.items())
        log(0, f"step {self.step}/{self.total} loss {self.loss:.4f}{more} ({now - self.t0:.0f}s)")

    def _record(self, record):
        """One line of OUT.metrics.jsonl (with this generation), and the same values to each logger."""
        record = dict(record, generation=self.generation)
        write_metrics(self.metrics, [record], append=True)
        for logger in self.loggers:
            logger.log(record)

    def _save_state(self):
        """OUT.state (rank 0): everything a resume needs to continue bitwise where this run is."""
        if self.rank == 0:
            save_checkpoint(dict(kind="resume", step=self.step, model=unwrap(self.model).state_dict(),
                                 optimizer=self.opt.state_dict(), scaler=self.scaler.state_dict(),
                                 rng=rng_state(), images=self.images, wall_s=time.time() - self.t0,
                                 generation=self.generation, config=self.config,
                                 extra=self.extra and self.extra.state_dict()), self.path)
        self.saved, self.saved_step = time.time(), self.step

    def cost(self, stage, batch):
        """This stage's training cost, for the checkpoint's `cost` list: its name, steps, batch, images, wall
        time, and where its curves are (the lines of OUT.metrics.jsonl of its generation)."""
        return dict(stage=stage, steps=self.step, batch=batch, images=self.images,
                    wall_s=round(time.time() - self.t0, 2), metrics=os.path.abspath(self.metrics),
                    generation=self.generation)

    def save_output(self, ckpt):
        """Rank 0 writes `out` (atomically), and only then drops the state and its claim on `out`: a kill
        at any moment leaves the state or the output."""
        if self.rank == 0:
            save_checkpoint(ckpt, self.out)
            if os.path.exists(self.path):
                os.remove(self.path)
            for logger in self.loggers:
                logger.close()
            release(self.out)
            log(0, f"wrote {self.out}")


def check_logging(kinds, out):
    """Before any work: the folders of --log's loggers can be made, else one line (kt.loggers, imported only
    when --log asks for one)."""
    if kinds:
        from kt.loggers import check_folders
        check_folders(kinds, out)


# ------------------------------------------------------------------------------------ the metrics file
def read_metrics(path, generation=None):
    """OUT.metrics.jsonl -> its records (dicts), in order; a line a kill cut short is left out. generation:
    only that training's lines (a checkpoint's cost entry names its own)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return [r for r in records if isinstance(r, dict) and isinstance(r.get("step"), int)
            and (generation is None or r.get("generation") == generation)]


def write_metrics(path, records, append=False):
    """Append records to a metrics file, one JSON line each; or replace it with them (atomically)."""
    text = "".join(json.dumps(r) + "\n" for r in records).encode()
    if append:
        with open(path, "ab") as f:
            f.write(text)
    elif records or os.path.exists(path):
        atomic_write(path, lambda f: f.write(text))


def converged(progress, key, name, advice):
    """After training: whether the logged `key` (a held-out loss, called `name`) had stopped falling
    (still_falling); if not, one line that says so and what to try. None (rank > 0, too few logs): unknown."""
    if progress.rank:
        return None
    curve = [(r["step"], r[key]) for r in read_metrics(progress.metrics) if isinstance(r.get(key), (int, float))]
    falling = still_falling(curve)
    if falling:
        log(0, f"not converged: the {name} was still falling at the end ({curve[0][1]:.4f} -> "
               f"{curve[-1][1]:.4f}; the rule: docs/files.md, metrics files); {advice}")
    return None if falling is None else not falling


def still_falling(curve, tail=0.5, share=0.15):
    """Whether a loss curve [(step, value), ...] is still falling clearly at its end: the last half of the
    steps brought more than 15% of its whole decrease. (On a cosine schedule a converged run has made almost
    all of its progress by half way; on the demo, 5 epochs give 29%, 15 give 9%, 45 give 4%.) None when the
    curve is too short to tell."""
    if len(curve) < 4:
        return None
    steps, values = zip(*curve)
    cut = steps[-1] - tail * (steps[-1] - steps[0])
    before = [v for s, v in curve if s <= cut][-1]
    whole, last = values[0] - min(values), before - values[-1]
    return whole > 0 and last > share * whole
