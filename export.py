"""Step 7, export: the small model as it ships, checked against PyTorch and timed.

The student is reparameterised first (models.deployed: FastViT, MobileOne, RepVGG fold their training
branches), then written as a torch.export program (OUT.pt2) and, when onnx and onnxscript are installed,
as ONNX (OUT.onnx, opset 18); both take any batch size. OUT.json holds what preprocessing needs (mean, std,
input size, interpolation, crop, class names), the check (each export's largest difference from the
PyTorch model on a few test images) and the latency at batch 1 and 64. A failed check writes nothing.

Reads:  a student checkpoint (finetune.py), a few test images of split.json (split.py).
Uses:   kt.models (rebuild, the deployed form), kt.data (test images).
Writes: OUT.pt2, OUT.onnx (optional), OUT.json.
Run:    python export.py --split runs/eurosat/split.json --student runs/eurosat/s0/student_kt_target_ft.pt \
            --out runs/eurosat/export/student.pt2
"""
import argparse
import contextlib
import importlib.util
import io
import json
import os
import time

import torch

from kt import checkpoints, claims, data, models
from kt.checks import fail, nonnegative, number, positive


def latency_ms(forward, x, repeats):
    """Median wall time of forward(x) in milliseconds, after one warm-up call."""
    forward(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        forward(x)
        times.append(time.perf_counter() - t)
    return 1000 * sorted(times)[len(times) // 2]


def export_onnx(program, path):
    """Write the exported program as ONNX (opset 18, any batch size). Returns (a function that runs the file
    with onnxruntime, or None; a note on what was skipped, or None): onnx, onnxscript and onnxruntime are
    optional packages."""
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]  # the exporter's needs
    if missing:
        return None, f"ONNX skipped: {' and '.join(missing)} not installed (pip install onnx onnxscript onnxruntime)"
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
        torch.onnx.export(program, f=path, input_names=["image"], output_names=["logits"], opset_version=18,
                          dynamo=True, external_data=False, verbose=False)  # one file: a small model fits
    try:
        import onnxruntime
    except ImportError:
        return None, "ONNX written but not checked: onnxruntime is not installed (pip install onnxruntime)"
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return (lambda x: torch.from_numpy(session.run(None, {"image": x.numpy()})[0])), None


def get_args_parser():
    p = argparse.ArgumentParser(description="export: the deployable student, as torch.export and ONNX programs",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--student", default="runs/demo/s0/student_kt_target_ft.pt", help="made by finetune.py")
    p.add_argument("--split", default="runs/demo/split.json", help="split.json (split.py): its test images "
                   "check the exports")
    p.add_argument("--data-root", default="data", help="where dataset references resolve")
    p.add_argument("--images", type=positive, default=8, help="test images the exports are checked on")
    p.add_argument("--tolerance", type=number("a number above 0", lambda x: x > 0), default=1e-3,
                   help="largest allowed difference from PyTorch, relative to the largest logit")
    p.add_argument("--repeats", type=nonnegative, default=5, help="timed runs per latency (0: do not time)")
    p.add_argument("--out", default="runs/demo/export/student.pt2", help="also writes OUT.onnx and OUT.json")
    return p


def main(args):
    claims.check_writable(args.out)
    ckpt = checkpoints.load_checkpoint(args.student, kinds=("student",), made_by="finetune.py")
    split = data.read_split(args.split)
    checkpoints.check_same_task(ckpt, args.student, split, args.split)
    model, folded = models.deployed(models.load_model(ckpt).eval())
    cfg, stem = ckpt["data_config"], os.path.splitext(args.out)[0]
    refs = data.part_refs(split, "test")[0][:args.images]
    images = data.Images(refs, None, models.transform(cfg, train=False), args.data_root)
    x = torch.stack([images[i][0] for i in range(len(images))])  # (N, 3, H, W), preprocessed as deployed
    with torch.inference_mode():
        want = models.load_model(ckpt).eval()(x)  # the training-form model: what was evaluated
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    runners = {"torch.export": program.module()}
    tmp = f"{stem}.onnx.tmp{os.getpid()}"  # renamed to OUT.onnx once the check has passed
    run_onnx, note = export_onnx(program, tmp)
    if run_onnx:
        runners["onnx"] = run_onnx
    check, scale = {}, want.abs().max().item()
    for name, run in runners.items():
        with torch.inference_mode():
            check[name] = (run(x) - want).abs().max().item() / scale
        if check[name] > args.tolerance:
            if os.path.exists(tmp):
                os.remove(tmp)
            fail(f"the {name} export differs from PyTorch by {check[name]:.2e} (relative) > --tolerance "
                 f"{args.tolerance}: nothing written")
    latency = {}
    for b in (1, 64) if args.repeats else ():
        xb = x[:1].expand(b, -1, -1, -1).contiguous()
        with torch.inference_mode():
            latency[f"batch_{b}"] = {n: round(latency_ms(r, xb, args.repeats), 3)
                                     for n, r in dict(pytorch=model, **runners).items()}
    checkpoints.atomic_write(args.out, lambda f: torch.export.save(program, f))
    files = [args.out]
    if os.path.exists(tmp):
        os.replace(tmp, stem + ".onnx")
        files.append(stem + ".onnx")
    output = ("segmentation logits (B, classes, h, w): resize to the image, argmax over classes"
              if checkpoints.task(ckpt) == "segmentation" else "classification logits (B, classes)")
    report = dict(student=args.student, arch=ckpt["recipe"]["arch"], reparameterized=folded, output=output,
                  classes=ckpt["classes"], data_config=cfg, check=dict(images=len(x), max_relative_diff=check),
                  latency_ms=latency, note=note, files=files)
    checkpoints.atomic_write(stem + ".json", lambda f: f.write(json.dumps(report, indent=1).encode()))
    if note:
        print(note)
    print(f"wrote {', '.join(files)} and {stem}.json: the check passed on {len(x)} test images "
          f"({', '.join(f'{n} {d:.1e}' for n, d in check.items())})")
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
