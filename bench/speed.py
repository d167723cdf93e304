"""Benchmark: how close distillation runs to its bound, the teacher's forward pass (like nanoGPT's bench.py).

Online distillation runs the frozen teacher on every view the student trains on; a ViT-L/14 teacher costs
~78 GMACs per 224px image, 20-100x a mobile student, so the best online distillation can do is the teacher's
forward throughput alone. This script measures, for one teacher, one student and one resolution, in one run,
images per second of:

  (a) teacher forward alone        inference mode + autocast, as distill.py runs it
  (b) student training step alone  distill_cached.student_step on one-hot labels (top-1 = cross-entropy)
  (c) distillation, naive          fp32 (TF32 off: PyTorch's defaults), NCHW, no compile, foreach AdamW
  (d) distillation, as shipped     distill.teacher_logits + distill.student_step with the GPU recipe on
                                   any device (--amp, bf16 by default, as distill.py on a GPU): autocast,
                                   channels_last for a conv student, fused AdamW, --compile if given
  (e) distillation from the cache  distill_cached.student_step on cached top-k (copied host -> device)

and prints the ratios d/a (target >= 0.70 on an H100), d/c (>= 3) and e/b (>= 0.80), and the serial
bound 1 / (1/a + 1/b) that online distillation cannot beat while teacher and student take turns.
Batches are random tensors already on the device and weights are random: this times the accelerator,
not image decoding (a real run needs enough --workers to keep up; the cache saves the teacher, not the
decoding).

Reads nothing; writes --out (JSON) if given.
Run:  python -m bench.speed --teacher vit_large_patch14_dinov2 --student fastvit_t8 --img-size 224 --compile
      python -m bench.speed --teacher test_vit --student test_resnet --img-size 32 --batch-size 32   (CPU, tiny)
"""
import argparse
import copy
import json
import time
from contextlib import nullcontext

import torch

import distill
import distill_cached
from kt import checkpoints, models, training


def measure(step, steps, warmup, batch, device):
    """Images per second of step(): `warmup` untimed calls (compilation, autotuning), then `steps` timed."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()  # the only wait: the GPU finishes the queued steps
    return batch * steps / (time.perf_counter() - t0)


def get_args_parser():
    p = argparse.ArgumentParser("bench: throughput of online, naive and cached distillation",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", default="vit_large_patch14_dinov2", help="timm name (random weights)")
    p.add_argument("--student", default="fastvit_t8", help="timm name (random weights)")
    p.add_argument("--img-size", type=int, default=224, help="resolution of both models")
    p.add_argument("--batch-size", type=int, default=128, help="images per step")
    p.add_argument("--classes", type=int, default=100, help="task classes (the heads' size)")
    p.add_argument("--topk", type=int, default=10, help="cached teacher probabilities per view")
    p.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per mode (compile happens here)")
    p.add_argument("--compile", action="store_true", help="torch.compile the shipped teacher and student")
    p.add_argument("--amp", default="bf16", choices=training.AMP_MODES, help="the shipped recipe's precision "
                   "(distill.py --amp): bf16 on any device, as a GPU with bf16 runs it")
    p.add_argument("--out", default=None, help="also write the results here (JSON)")
    return p


def main(args):
    device, _, _ = training.setup(0)  # as distill.py: TF32 on for any fp32 matmul on a GPU
    autocast, scaler = training.amp(device, args.amp)
    B, S, C = args.batch_size, args.img_size, args.classes
    teacher, _, t_cfg = models.create_model(args.teacher, C, img_size=S)
    student, _, s_cfg = models.create_model(args.student, C, img_size=S)
    teacher = teacher.to(device).eval().requires_grad_(False)
    naive_student = copy.deepcopy(student).to(device).train()
    student, channels_last = training.prepare(student.to(device).train(), device, compile=args.compile,
                                              amp_mode=args.amp)
    fast_teacher = torch.compile(teacher) if args.compile else teacher
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, fused=True)
    naive_opt = torch.optim.AdamW(naive_student.parameters(), lr=1e-4)
    fp32 = torch.amp.GradScaler(device.type, enabled=False)

    x = torch.rand(B, 3, S, S, device=device)  # views in [0, 1], as the loader delivers them
    one, top1 = torch.ones(B, 1, device=device), torch.randint(0, C, (B, 1), device=device)  # one-hot labels
    k = min(args.topk, C)
    pin = device.type == "cuda"
    prob = torch.rand(B, k).softmax(-1).half().pin_memory() if pin else torch.rand(B, k).softmax(-1).half()
    cls = torch.randint(0, C, (B, k), dtype=torch.int16)
    cls = cls.pin_memory() if pin else cls

    def teacher_alone():
        distill.teacher_outputs(fast_teacher, x, t_cfg, autocast)

    def student_alone():
        distill_cached.student_step(student, opt, scaler, autocast, x, s_cfg, one, top1, 1.0, channels_last)

    def naive():
        t = distill.teacher_outputs(teacher, x, t_cfg, nullcontext)
        distill.student_step(naive_student, naive_opt, fp32, nullcontext, x, s_cfg, t, 1.0, False)

    def shipped():
        t = distill.teacher_outputs(fast_teacher, x, t_cfg, autocast)
        distill.student_step(student, opt, scaler, autocast, x, s_cfg, t, 1.0, channels_last)

    def cached():
        p, c = prob.to(device, non_blocking=True), cls.to(device, non_blocking=True)
        distill_cached.student_step(student, opt, scaler, autocast, x, s_cfg, p, c, 1.0, channels_last)

    modes = dict(a_teacher=("(a) teacher forward alone", teacher_alone),
                 b_student=("(b) student training step alone", student_alone),
                 c_naive=("(c) distillation, naive (fp32, NCHW, eager)", naive),
                 d_shipped=("(d) distillation, as shipped", shipped),
                 e_cached=("(e) distillation from the cache", cached))
    fused = [m.fused_attn for m in teacher.modules() if hasattr(m, "fused_attn")]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"# bench: teacher {args.teacher}, student {args.student}, {S}px, batch {B}, {C} classes, "
          f"top-{k}; {name}, torch {torch.__version__}")
    dtype = training.amp_dtype(device, args.amp)
    print(f"# shipped: autocast {str(dtype).removeprefix('torch.') if dtype else 'off'}, channels_last {channels_last}, "
          f"compile {args.compile}, fused AdamW, SDPA attention in {sum(fused)}/{len(fused)} teacher blocks")
    table = {}
    for key, (label, step) in modes.items():
        tf32 = torch.backends.cuda.matmul.allow_tf32
        if key == "c_naive":  # PyTorch's defaults: full fp32 matmuls and convolutions
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            table[key] = measure(step, args.steps, args.warmup, B, device)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        print(f"{label:<46} {table[key]:>10.1f} img/s", flush=True)
    r = dict(d_over_a=table["d_shipped"] / table["a_teacher"], d_over_c=table["d_shipped"] / table["c_naive"],
             e_over_b=table["e_cached"] / table["b_student"])
    # Teacher and student run one after the other, so d cannot beat 1 / (1/a + 1/b): d/a >= 0.70 needs a
    # student step at least 2.3x faster than the teacher's forward. d / serial shows what the glue costs.
    serial = 1 / (1 / table["a_teacher"] + 1 / table["b_student"])
    r.update(serial_bound=serial, d_over_serial=table["d_shipped"] / serial)
    print(f"d/a = {r['d_over_a']:.2f} (H100 target >= 0.70)   d/c = {r['d_over_c']:.2f} (>= 3)   "
          f"e/b = {r['e_over_b']:.2f} (>= 0.80)")
    print(f"serial bound 1/(1/a + 1/b) = {serial:.1f} img/s (d/a at most {serial / table['a_teacher']:.2f}); "
          f"d reaches {r['d_over_serial']:.2f} of it")
    if args.out:
        checkpoints.atomic_write(args.out, lambda f: f.write(json.dumps(dict(
            args=vars(args), device=name, torch=torch.__version__, img_per_s=table, ratios=r), indent=1).encode()))
    return table


if __name__ == "__main__":
    main(get_args_parser().parse_args())
