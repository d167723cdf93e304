"""Step 7, export: the small model as it ships, checked against PyTorch and timed.

The student is reparameterised first (models.deployed: FastViT, MobileOne, RepVGG fold their training
branches), then written as a torch.export program (OUT.pt2) and, when onnx and onnxscript are installed,
as ONNX (OUT.onnx, opset 18); both take any batch size. A classifier is also written where timm users look
for models: OUT_timm/, a folder timm.create_model("local-dir:OUT_timm", pretrained=True) loads (and the
Hugging Face hub takes as it is), with a model card. OUT.json holds what preprocessing needs (mean, std,
input size, interpolation, crop, class names), the check (each export's largest difference from the
PyTorch model on a few test images) and the latency at batch 1 and 64. A failed check writes nothing.

Reads:  a student checkpoint (finetune.py), a few test images of split.json (split.py).
Uses:   kt.data, kt.models; kt.checkpoints, kt.claims, kt.checks; where used: kt.segmenters.
Writes: OUT.pt2, OUT.onnx (optional), OUT.json, OUT_timm/ (config.json, model.safetensors, README.md).
Run:    python export.py --split runs/eurosat/split.json --student runs/eurosat/s0/student_kt_target_ft.pt \
            --out runs/eurosat/export/student.pt2
"""
import argparse
import contextlib
import importlib.util
import io
import json
import os
import shutil
import time

import torch

from kt import checkpoints, claims, data, models
from kt.checks import fail, nonnegative, number, positive


def results_row(path, student):
    """The row of evaluate.py's results.json whose checkpoint is `student` (None without one)."""
    if not path:
        return None
    try:
        with open(path) as f:
            runs = json.load(f)["runs"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        fail(f"--results {path} is not evaluate.py's results.json ({type(e).__name__})")
    same = lambda p: os.path.exists(p) and os.path.samefile(p, student)
    return next((r for r in runs.values() if same(r.get("checkpoint", ""))), None)


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


def timm_folder(ckpt, folder, row):
    """The student as timm users load models: timm.models.save_for_hf writes config.json (architecture,
    class names, pretrained_cfg with mean, std, input size) and model.safetensors into `folder`, beside a
    model card (README.md), so that timm.create_model("local-dir:FOLDER", pretrained=True) rebuilds it and
    huggingface_hub can upload the folder as it is. Returns a function that runs the reloaded model."""
    import timm
    from timm.models import save_for_hf
    save_for_hf(models.load_model(ckpt).eval(), folder, model_config=dict(label_names=ckpt["classes"]),
                data_config=ckpt["data_config"], safe_serialization=True)
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
        f.write(model_card(ckpt, row))
    return timm.create_model("local-dir:" + folder, pretrained=True).eval()


def model_card(ckpt, row):
    """The model card: what the model is for, how it was made and scored, in which form its weights are."""
    split, cfg, lineage = ckpt.get("split", {}), ckpt["data_config"], ckpt.get("lineage", {})
    scores = {k: round(v, 2) for k, v in (row or {}).items() if k in ("top1", "mean_class", "agreement", "val_top1")}
    stages = " + ".join(f"{c.get('stage', c.get('step'))} {c['steps']}x{c['batch']}" for c in ckpt["cost"])
    return f"""---
library_name: timm
tags: [image-classification, timm, knowledge-distillation]
---
# {ckpt["recipe"]["arch"]}: {split.get("dataset", "a task")}, {len(ckpt["classes"])} classes

A small model trained by task-oriented knowledge transfer from a vision foundation model (Vemulapalli et
al., ICML 2024, arXiv 2311.18237): distilled from the finetuned teacher on a transfer set of unlabeled
images, then finetuned on the labels.

| | |
|---|---|
| classes | {", ".join(ckpt["classes"])} |
| input | {"x".join(map(str, cfg["input_size"]))}, mean {cfg["mean"]}, std {cfg["std"]}, {cfg["interpolation"]} |
| labels | {split.get("dataset")}: {split.get("budget") or f"{split.get('shots')} per class, seed {split.get('seed')}"} |
| test scores (%) | {scores or "not given (export.py --results results.json)"} |
| teacher | {lineage.get("teacher", "-")} |
| transfer set | {lineage.get("transfer", "-")} ({lineage.get("transfer_images", "-")} images) |
| training | {stages} |
| weights | the training form{" (its branches fold into single convolutions for inference: timm.utils.reparameterize_model(model); the .pt2 and .onnx beside this folder are the folded form)" if models.deployed(models.load_model(ckpt))[1] else ""} |

```python
import timm
model = timm.create_model("local-dir:THIS_FOLDER", pretrained=True).eval()
transform = timm.data.create_transform(**timm.data.resolve_data_config({{}}, model=model))
labels = model.pretrained_cfg["label_names"]
```
"""


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
    p.add_argument("--results", help="evaluate.py's results.json: the student's row goes into the model card")
    p.add_argument("--out", default="runs/demo/export/student.pt2", help="also writes OUT.onnx, OUT.json and, for "
                   "a classifier, the timm model folder OUT_timm/")
    return p


def main(args):
    claims.check_writable(args.out, reads=(args.student, args.split, args.results))
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
    timm_tmp = f"{stem}_timm.tmp{os.getpid()}"  # renamed to OUT_timm/ once the check has passed
    if checkpoints.task(ckpt) == "classification":  # a segmenter is no timm model: its .pt2 is the export
        runners["timm folder"] = timm_folder(ckpt, timm_tmp, results_row(args.results, args.student))
    check, scale = {}, want.abs().max().item()
    for name, run in runners.items():
        with torch.inference_mode():
            check[name] = (run(x) - want).abs().max().item() / scale
        if check[name] > args.tolerance:
            if os.path.exists(tmp):
                os.remove(tmp)
            shutil.rmtree(timm_tmp, ignore_errors=True)
            fail(f"the {name} export differs from PyTorch by {check[name]:.2e} (relative) > --tolerance "
                 f"{args.tolerance}: nothing written")
    latency = {}
    for b in (1, 64) if args.repeats else ():
        xb = x[:1].expand(b, -1, -1, -1).contiguous()
        with torch.inference_mode():
            latency[f"batch_{b}"] = {n: round(latency_ms(r, xb, args.repeats), 3)
                                     for n, r in dict(pytorch=model, **runners).items() if n != "timm folder"}
    program_bytes = io.BytesIO()  # in memory first: a full disk is then one line, not a crash in torch's writer
    torch.export.save(program, program_bytes)
    checkpoints.atomic_write(args.out, lambda f: f.write(program_bytes.getvalue()))
    files = [args.out]
    if os.path.exists(tmp):
        os.replace(tmp, stem + ".onnx")
        files.append(stem + ".onnx")
    if os.path.isdir(timm_tmp):
        shutil.rmtree(stem + "_timm", ignore_errors=True)
        os.replace(timm_tmp, stem + "_timm")
        files.append(stem + "_timm/")
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
