"""What every training loop needs besides the lesson: device, torchrun/DDP, AMP, the lr schedule, and
Progress (resumable states, logging, a NaN guard, Ctrl-C), so each step's loop shows only what it teaches.
"""
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from checkpoints import digest, load_checkpoint, plain, release, save_checkpoint
from checks import fail, first_line

STATE_FORMAT = 2  # the layout of a resumable state; a state of another format is not resumed
NOT_RESUMED = ("resume", "save_every", "workers", "out", "data_root", "compile")  # flags a resume may change


def setup(seed):
    """Device and torchrun/DDP context. Returns (device, rank, world). One process works unchanged."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        if local >= torch.cuda.device_count():
            fail(f"local rank {local} but {torch.cuda.device_count()} GPU(s) on this node: lower --nproc_per_node")
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)
    return device, rank, world


def amp(device):
    """Autocast context and GradScaler: bf16 where the GPU has it, fp16 + loss scaling otherwise; fp32 on CPU."""
    if device.type != "cuda":
        return nullcontext, torch.amp.GradScaler("cpu", enabled=False)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return (lambda: torch.autocast("cuda", dtype=dtype)), torch.amp.GradScaler("cuda",
                                                                               enabled=dtype == torch.float16)


IGNORE = 255  # mask pixels that are not labeled (mmsegmentation's ignore index)


def label_loss(logits, labels, smoothing=0.0):
    """Cross-entropy with the labels: (B, C) logits and (B,) classes; or per pixel (segmentation), the
    (B, C, h, w) logits resized to the (B, H, W) masks, pixels marked IGNORE left out."""
    if logits.dim() == 4:  # (a class 255 of ImageNet's is a class: IGNORE is for masks alone)
        logits = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
        return F.cross_entropy(logits, labels, ignore_index=IGNORE, label_smoothing=smoothing)
    return F.cross_entropy(logits, labels, label_smoothing=smoothing)


def cosine_lr(step, total, warmup):
    """LR multiplier: linear warmup for `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def ddp(model, device, world):
    """Wrap a trained model for torchrun; the frozen teacher is never wrapped (it has no gradients)."""
    if world == 1:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def prepare(model, device, world=1, compile=False):
    """A trained model at speed. Returns (model, channels_last).

    Order matters: channels_last first (it re-lays the weights; NHWC convolutions are faster on tensor
    cores, a ViT gains nothing), then DDP (torchrun), then torch.compile of the DDP module, which lets the
    compiler split the graph at DDP's gradient buckets and overlap their all-reduce with the backward pass.
    """
    channels_last = device.type == "cuda" and not hasattr(model, "patch_embed")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ddp(model, device, world)
    return (torch.compile(model) if compile else model), channels_last


def unwrap(model):
    """The plain module inside DDP and torch.compile wrappers: its state dict has the plain names."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    return getattr(model, "_orig_mod", model)  # torch.compile


def log(rank, *msg):
    """A line on stderr from rank 0 (through tqdm, so that a progress bar stays whole)."""
    if rank == 0:
        tqdm.write(" ".join(map(str, msg)), file=sys.stderr)
        sys.stderr.flush()


def bar(iterable=None, rank=0, **kwargs):
    """A tqdm progress bar on stderr for rank 0, shown only when stderr is a terminal (logs stay clean)."""
    return tqdm(iterable, disable=None if rank == 0 else True, file=sys.stderr, dynamic_ncols=True, **kwargs)


# ---------------------------------------------------------------------------------- resumable states
def run_config(args, **inputs):
    """What a resumable state must match: the step's flags (but NOT_RESUMED), the contents of its input
    files (`inputs`: name -> path; compared by sha1) and the state format."""
    flags = {k: v for k, v in plain(args).items() if k not in NOT_RESUMED}
    return dict(format=STATE_FORMAT, flags=flags, inputs={k: digest(p) for k, p in inputs.items()})


def config_differences(saved, wanted):
    """What differs between two run configs, as a short list of words for an error message."""
    if saved.get("format") != wanted["format"]:
        return [f"state format {saved.get('format')} vs {wanted['format']}"]
    flags, inputs = saved.get("flags", {}), saved.get("inputs", {})
    return ([f"--{k.replace('_', '-')} {flags.get(k)} vs {v}" for k, v in wanted["flags"].items() if flags.get(k) != v]
            + [f"the content of {k}" for k, v in wanted["inputs"].items() if inputs.get(k) != v])


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
    it, and saves the state (weights, optimizer, scaler, RNG, step, `config`) to OUT.state. A state is
    resumed only if its config matches. Under torchrun the ranks decide together every `agree_every` steps
    (one all-reduce), so all of them stop at the same step. save_output() writes `out`, then drops the state.
    """

    def __init__(self, out, model, optimizer, scaler, total, save_every, rank=0, resume=False,
                 per_epoch=0, agree_every=20, config=None, measure=None):
        self.out, self.path, self.model, self.opt, self.scaler = out, out + ".state", model, optimizer, scaler
        self.measure, self.measured = measure, {}  # measure(): more numbers for the log (rank 0), e.g. held-out
        self.total, self.save_every, self.rank, self.per_epoch = total, save_every, rank, per_epoch
        self.config = config or {}
        self.world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        self.agree_every = min(agree_every, save_every) if self.world > 1 else 1
        self.step, self.images, self.wall, self.loss = 0, 0, 0.0, float("nan")
        if resume and os.path.exists(self.path):
            state = load_checkpoint(self.path, kinds=("resume",))
            differ = config_differences(state["config"], self.config) if config else []
            if differ:
                fail(f"{self.path} is the state of another run ({', '.join(differ[:4])}); rerun that run's "
                     "command, or delete the state to start this one afresh")
            try:
                unwrap(model).load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
                scaler.load_state_dict(state["scaler"])
            except (RuntimeError, ValueError, KeyError) as e:
                fail(f"{self.path} does not fit this model ({first_line(e)}); delete it to start afresh")
            set_rng_state(state["rng"])
            self.step, self.images, self.wall = state["step"], state["images"], state["wall_s"]
            log(rank, f"resuming {self.path} at step {self.step}/{total}")

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
        self.step, self.images, self.count = self.step + 1, self.images + images, self.count + 1
        self.running = self.running + loss.detach().float()
        self.bar.update()  # rate and time left; no tensor is read here
        if self.step % self.agree_every and not self.done:
            return  # torchrun: ranks decide only together
        since = self.step - self.saved_step  # steps since the last save
        epoch = self.per_epoch and since >= self.per_epoch and time.time() - self.saved > 60
        save = since >= self.save_every or epoch or self.done
        if self.world > 1:  # the one collective per agree_every steps: sums over ranks
            v = torch.stack([torch.as_tensor(self.running, device=loss.device), *(torch.tensor(
                float(f), device=loss.device) for f in (self.count, self.stop, save))])
            torch.distributed.all_reduce(v)
            running, count, stop, save = v.tolist()  # the host waits here, every agree_every steps
            self.stop, save = stop > 0, save > 0
        else:
            running, count = self.running, self.count
        if not (save or self.stop):
            return
        self.loss = float(running / count)  # the one host-device sync per interval
        self.running, self.count = 0.0, 0
        if not math.isfinite(self.loss):
            kept = f"the last good state is {self.path}" if os.path.exists(self.path) else "no state was saved"
            fail(f"loss is {self.loss} at step {self.step}; {kept}; lower --lr")
        self.measured = self.measure() if self.measure and self.rank == 0 else {}
        self.bar.set_postfix(loss=f"{self.loss:.4f}", **{k: f"{v:.4f}" for k, v in self.measured.items()}, refresh=False)
        more = "".join(f" {k.replace('_', ' ')} {v:.4f}" for k, v in self.measured.items())
        log(self.rank, f"step {self.step}/{self.total} loss {self.loss:.4f}{more} ({time.time() - self.t0:.0f}s)")
        if self.rank == 0:
            save_checkpoint(dict(kind="resume", step=self.step, model=unwrap(self.model).state_dict(),
                                 optimizer=self.opt.state_dict(), scaler=self.scaler.state_dict(),
                                 rng=rng_state(), images=self.images, wall_s=time.time() - self.t0,
                                 config=self.config), self.path)
        self.saved, self.saved_step = time.time(), self.step
        if self.stop:
            fail(f"interrupted at step {self.step}: saved {self.path}; rerun with --resume to continue")

    def finish(self, name, batch):
        """The training cost, for the checkpoint: this stage's name, steps, batch, images and wall time."""
        return dict(step=name, steps=self.step, batch=batch, images=self.images,
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
