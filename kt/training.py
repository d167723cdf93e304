"""What every training loop needs besides the lesson: device, torchrun/DDP, AMP, the lr schedule, the label
loss and logging, so each step's loop shows only what it teaches (kt.progress makes it resumable).
"""
import math
import os
import random
import sys
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from kt.checks import fail


def setup(seed):
    """Device and torchrun/DDP context. Returns (device, rank, world). One process works unchanged.

    The lines marked "CUDA only" are the GPU recipe's few that need a GPU itself (choosing it, TF32, NCCL,
    synchronising a timer, the GPU's RNG); everything else it does runs on the CPU too (amp, prepare)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    device = torch.device("cpu")
    if torch.cuda.is_available():  # CUDA only
        local = int(os.environ.get("LOCAL_RANK", 0))
        if local >= torch.cuda.device_count():
            fail(f"local rank {local} but {torch.cuda.device_count()} GPU(s) on this node: lower --nproc_per_node")
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)
    return device, rank, world


AMP_MODES = ("auto", "bf16", "fp16", "off")  # --amp
AMP_HELP = ("mixed precision: auto (bf16 on a GPU that has it, else fp16; float32 on the CPU), or bf16, fp16, off "
            "on any device (bf16 on the CPU runs the GPU recipe: autocast, fused AdamW; channels_last on a GPU)")


def amp_dtype(device, mode="auto"):
    """The one choice of precision: the autocast dtype (bf16, fp16), or None for float32. auto: bf16 on a GPU
    that has it, fp16 on one that has not, float32 on the CPU; bf16 / fp16 / off: that on any device. The
    CPU runs bf16 and fp16 autocast too, so the GPU recipe's lines run (and are tested) without a GPU."""
    if mode == "auto":
        mode = "off" if device.type != "cuda" else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return dict(bf16=torch.bfloat16, fp16=torch.float16).get(mode)


def amp(device, mode="auto"):
    """Autocast context and GradScaler for the precision amp_dtype() chooses: fp16 scales the loss (its small
    gradients would underflow), bf16 and float32 need no scaling."""
    dtype = amp_dtype(device, mode)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    if dtype is None:
        return nullcontext, scaler
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler


def label_loss(logits, labels, smoothing=0.0):
    """Cross-entropy with the labels: (B, C) logits and (B,) classes; or per pixel (segmentation), the
    (B, C, h, w) logits resized to the (B, H, W) masks, pixels marked masks.IGNORE left out."""
    if logits.dim() == 4:  # (a class 255 of ImageNet's is a class: IGNORE is for masks alone)
        from kt.masks import IGNORE
        logits = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
        return F.cross_entropy(logits, labels, ignore_index=IGNORE, label_smoothing=smoothing)
    return F.cross_entropy(logits, labels, label_smoothing=smoothing)


def freeze_batchnorm(model):
    """BatchNorm layers in eval mode: they normalise with the running statistics the model came with and
    stop updating them (their scale and shift still train). Call after model.train()."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


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


def prepare(model, device, world=1, compile=False, amp_mode="auto"):
    """A trained model at speed. Returns (model, channels_last).

    Order matters: channels_last first (it re-lays the weights: NHWC convolutions are what tensor cores
    want; a ViT gains nothing), for a convolutional model in reduced precision on a GPU; then DDP
    (torchrun); then torch.compile of the DDP module, which lets the compiler split the graph at DDP's
    gradient buckets and overlap their all-reduce with the backward pass. (Not on the CPU: there PyTorch's
    NHWC convolution backward crashes on FastViT's stem, a strided 1x1 convolution of the RGB image.)
    """
    convolutional = sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 1  # a ViT's one is its patch embed
    channels_last = device.type == "cuda" and amp_dtype(device, amp_mode) is not None and convolutional
    if channels_last:  # CUDA only
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
