"""Resumable training: the training of one output file, saved to OUT.state and resumed from it, its loss
read once per interval and logged, stopped cleanly on a NaN loss or a signal. A step's loop calls
progress.update(loss, images) after each optimizer step and progress.save_output(checkpoint) at the end.
"""
import math
import os
import random
import signal
import time

import numpy as np
import torch

from kt.checkpoints import differences, digest, load_checkpoint, plain, save_checkpoint
from kt.checks import fail, first_line
from kt.claims import release
from kt.training import bar, log, unwrap

STATE_FORMAT = 3  # the layout of a resumable state; a state of another format is not resumed
NOT_RESUMED = ("resume", "save_every", "workers", "out", "data_root", "compile")  # flags a resume may change


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
    if s["cuda"]:
        torch.cuda.set_rng_state_all(s["cuda"])


class Progress:
    """The training of one output file `out`: resume, log, stop on NaN, save states, stop cleanly on a signal.

    update() adds each step's loss on the device. Every `save_every` steps, after an epoch of `per_epoch`
    steps (at most once a minute), at the end or on Ctrl-C, SIGTERM or SIGHUP, it reads the loss once, logs
    it (with measure()'s numbers, rank 0), and saves the state (weights, optimizer, scaler, RNG, step,
    `config`) to OUT.state. resume() continues from a state only if its config matches. Under torchrun
    the ranks decide together every `agree_every` steps (one all-reduce), so all of them stop at the same
    step. save_output() writes `out`, then drops the state.
    """

    def __init__(self, out, *, model, optimizer, scaler, total, config=None, save_every=500, per_epoch=0, rank=0,
                 measure=None, agree_every=20):
        self.out, self.path, self.model, self.opt, self.scaler = out, out + ".state", model, optimizer, scaler
        self.total, self.config, self.save_every, self.per_epoch, self.rank = total, config or {}, save_every, per_epoch, rank
        self.measure, self.measured = measure, {}  # measure(): more numbers for the log, e.g. a held-out loss
        self.world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        self.agree_every = min(agree_every, save_every) if self.world > 1 else 1
        self.step, self.images, self.wall, self.loss = 0, 0, 0.0, float("nan")

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
        except (RuntimeError, ValueError, KeyError) as e:
            fail(f"{self.path} does not fit this model ({first_line(e)}); delete it to start afresh")
        set_rng_state(state["rng"])
        self.step, self.images, self.wall = state["step"], state["images"], state["wall_s"]
        log(self.rank, f"resuming {self.path} at step {self.step}/{self.total}")

    def __enter__(self):
        self.stop, self.t0, self.running, self.count = False, time.time() - self.wall, 0.0, 0
        self.saved, self.saved_step = time.time(), self.step
        self.old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        self.bar = bar(total=self.total, initial=self.step, rank=self.rank, unit="step", leave=False)
        return self

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
        running, count, save, stop = self._decide()
        if save or stop:
            self._read_loss(running, count)
            self._log()
            self._save_state()
            if stop:
                fail(f"interrupted at step {self.step}: saved {self.path}; rerun with --resume to continue")

    def _decide(self):
        """Whether to save now (an interval, an epoch, the end) and whether to stop (a signal on any rank);
        under torchrun the one collective per agree_every steps sums both, and the losses, over the ranks."""
        since = self.step - self.saved_step
        epoch = self.per_epoch and since >= self.per_epoch and time.time() - self.saved > 60
        save = since >= self.save_every or epoch or self.done
        if self.world == 1:
            return self.running, self.count, save, self.stop
        device = self.running.device
        v = torch.stack([self.running, *(torch.tensor(float(f), device=device) for f in (self.count, self.stop, save))])
        torch.distributed.all_reduce(v)
        running, count, stop, save = v.tolist()  # the host waits here, every agree_every steps
        self.stop = stop > 0
        return running, count, save > 0, self.stop

    def _read_loss(self, running, count):
        """The mean loss since the last read: the one host-device sync per interval. NaN stops the step."""
        self.loss = float(running / count)
        self.running, self.count = 0.0, 0
        if not math.isfinite(self.loss):
            kept = f"the last good state is {self.path}" if os.path.exists(self.path) else "no state was saved"
            fail(f"loss is {self.loss} at step {self.step}; {kept}; lower --lr")

    def _log(self):
        """The log line (rank 0): step, loss, measure()'s numbers, time so far."""
        self.measured = self.measure() if self.measure and self.rank == 0 else {}
        self.bar.set_postfix(loss=f"{self.loss:.4f}", **{k: f"{v:.4f}" for k, v in self.measured.items()}, refresh=False)
        more = "".join(f" {k.replace('_', ' ')} {v:.4f}" for k, v in self.measured.items())
        log(self.rank, f"step {self.step}/{self.total} loss {self.loss:.4f}{more} ({time.time() - self.t0:.0f}s)")

    def _save_state(self):
        """OUT.state (rank 0): everything a resume needs to continue bitwise where this run is."""
        if self.rank == 0:
            save_checkpoint(dict(kind="resume", step=self.step, model=unwrap(self.model).state_dict(),
                                 optimizer=self.opt.state_dict(), scaler=self.scaler.state_dict(),
                                 rng=rng_state(), images=self.images, wall_s=time.time() - self.t0,
                                 config=self.config), self.path)
        self.saved, self.saved_step = time.time(), self.step

    def cost(self, stage, batch):
        """This stage's training cost, for the checkpoint's `cost` list: its name, steps, batch, images, wall time."""
        return dict(stage=stage, steps=self.step, batch=batch, images=self.images,
                    wall_s=round(time.time() - self.t0, 2))

    def save_output(self, ckpt):
        """Rank 0 writes `out` (atomically), and only then drops the state and its claim on `out`: a kill
        at any moment leaves the state or the output."""
        if self.rank == 0:
            save_checkpoint(ckpt, self.out)
            if os.path.exists(self.path):
                os.remove(self.path)
            release(self.out)
            log(0, f"wrote {self.out}")
