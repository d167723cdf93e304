"""Step 7, export: the small model as it ships, checked against PyTorch and timed, in one folder.

The student is reparameterised first (models.deployed: FastViT, MobileOne, RepVGG fold their training
branches), then written as a torch.export program (model.pt2) and, when onnx and onnxscript are installed,
as ONNX (model.onnx, opset 18); both take any batch size. A classifier's folder is also what timm users and
the Hugging Face Hub look for: config.json and model.safetensors (timm's save_for_hf), so that
timm.create_model("local-dir:OUT", pretrained=True) loads it and `hf upload` takes it as it is, and a model
card (README.md: the Hub's metadata, with the test scores as its model-index). export.json holds what
preprocessing needs (mean, std, input size, interpolation, crop, class names), the check (each export's
largest difference from the PyTorch model on a few test images) and the latency at batch 1 and 64.

The folder is one generation: it is made aside and put in place whole (kt.claims.commit_folder), so a kill
at any moment leaves the previous export or this one, and a failed check writes nothing.

Reads:  a student checkpoint (finetune.py), a few test images of split.json (split.py); with --results,
        evaluate.py's results.json (the student's row goes into the card).
Uses:   kt.data, kt.models; kt.checkpoints, kt.claims, kt.checks; where used: kt.segmenters.
Writes: OUT/ = model.pt2, model.onnx (optional), export.json; a classifier's also config.json,
        model.safetensors, README.md.
Run:    python export.py --split runs/eurosat/split.json --student runs/eurosat/s0/student_kt_target_ft.pt \
            --results runs/eurosat/results.json --out runs/eurosat/export/student_kt_target
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

REPORT = "export.json"  # in every folder export.py writes: the mark of its folders


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


def timm_folder(ckpt, trained, folder):
    """The student as timm users load models: timm.models.save_for_hf writes config.json (architecture,
    class names, pretrained_cfg with mean, std, input size) and model.safetensors into `folder`, so that
    timm.create_model("local-dir:FOLDER", pretrained=True) rebuilds it. The init weights' tag and license are
    taken out of the config: these weights are not those. Returns the reloaded model, to check."""
    import timm
    from timm.models import save_for_hf
    save_for_hf(trained, folder, model_config=dict(label_names=ckpt["classes"]),
                data_config=ckpt["data_config"], safe_serialization=True)
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    for stale in ("tag", "license"):
        config["pretrained_cfg"].pop(stale, None)
    checkpoints.atomic_write(path, lambda f: f.write(json.dumps(config, indent=2).encode()))
    return timm.create_model("local-dir:" + folder, pretrained=True).eval()


def dataset_name(name):
    """A dataset as the Hub names it: hf:OWNER/NAME[:CONFIG] -> OWNER/NAME, folder:PATH -> the folder's name
    (no local path goes into a card), a torchvision dataset by its own name."""
    if name.startswith("hf:"):
        spec = name[3:].split(":")[0]
        return spec if not os.path.isabs(spec) else os.path.basename(spec.rstrip("/"))
    return os.path.basename(name[len("folder:"):].rstrip("/")) if name.startswith("folder:") else name


SCORES = dict(top1="top-1 accuracy", mean_class="mean per-class accuracy", val_top1="val top-1 accuracy",
              agreement="top-1 agreement with the teacher")


def model_card(ckpt, row, license, folded):
    """The model card (README.md) as the Hub shows it: its metadata (huggingface_hub's ModelCardData:
    pipeline_tag, library_name, tags, base_model where the student started from hub weights, the license
    given, the test scores as a model-index), then what the model is for, how it was made and scored."""
    from huggingface_hub import EvalResult, ModelCardData
    split, cfg, lineage = ckpt.get("split", {}), ckpt["data_config"], ckpt.get("lineage", {})
    dataset = dataset_name(split.get("dataset", "task"))
    scores = {k: round(row[k], 2) for k in SCORES if k in (row or {})}
    results = [EvalResult(task_type="image-classification", dataset_type=dataset, dataset_name=dataset,
                          dataset_split="test" if k != "val_top1" else "validation", metric_type="accuracy",
                          metric_name=SCORES[k], metric_value=v) for k, v in scores.items() if k != "agreement"]
    base = ckpt.get("init", {}).get("base_model")
    data = ModelCardData(library_name="timm", pipeline_tag="image-classification", license=license,
                         tags=["image-classification", "timm", "knowledge-distillation"], base_model=base,
                         model_name=f"{ckpt['recipe']['arch']}-{dataset}", eval_results=results or None)
    stages = " + ".join(f"{c.get('stage', c.get('step'))} {c['steps']}x{c['batch']}" for c in ckpt["cost"])
    table = "".join(f"| {SCORES[k]} | {v} |\n" for k, v in scores.items()) or \
        "| (not given: export.py --results results.json) | |\n"
    return f"""---
{data.to_yaml()}
---
# {ckpt["recipe"]["arch"]}: {dataset}, {len(ckpt["classes"])} classes

A small model trained by task-oriented knowledge transfer from a vision foundation model (Vemulapalli et
al., ICML 2024, arXiv 2311.18237): distilled from the finetuned teacher on a transfer set of unlabeled
images, then finetuned on the labels.

## Test scores (%)

| metric | value |
|---|---|
{table}
## How it was made

| | |
|---|---|
| classes | {", ".join(ckpt["classes"])} |
| input | {"x".join(map(str, cfg["input_size"]))}, mean {cfg["mean"]}, std {cfg["std"]}, {cfg["interpolation"]} |
| labels | {dataset}: {split.get("budget") or f"{split.get('shots')} per class, seed {split.get('seed')}"} |
| init | {base or ckpt.get("init", {}).get("weights", "-")} |
| teacher | {lineage.get("teacher", "-")} |
| transfer set | {lineage.get("transfer", "-")} ({lineage.get("transfer_images", "-")} images) |
| training | {stages} |
| weights | the training form{" (its branches fold into single convolutions for inference: timm.utils.reparameterize_model(model); model.pt2 and model.onnx are the folded form)" if folded else ""} |

## Use

```python
import timm
model = timm.create_model("local-dir:THIS_FOLDER", pretrained=True).eval()  # or "hf-hub:USER/REPO" once uploaded
transform = timm.data.create_transform(**timm.data.resolve_data_config({{}}, model=model))
labels = model.pretrained_cfg["label_names"]
```

Also here: model.pt2 (torch.export; `torch.export.load("model.pt2").module()`), model.onnx (where exported)
and export.json (preprocessing, the exports' check against PyTorch, latency).
"""


def write_exports(folder, program, ckpt, trained, row, args, classifier, folded, x, want, model):
    """Every export of the student into `folder`, each checked against the PyTorch model's outputs `want`
    on the test images x (relative difference <= --tolerance, else one line and nothing kept), timed, and
    described in export.json. Returns that report."""
    runners = {"torch.export": program.module()}
    run_onnx, note = export_onnx(program, os.path.join(folder, "model.onnx"))
    if run_onnx:
        runners["onnx"] = run_onnx
    if classifier:  # a segmenter is no timm model: its .pt2 is the export
        runners["timm folder"] = timm_folder(ckpt, trained, folder)
        checkpoints.atomic_write(os.path.join(folder, "README.md"),
                                 lambda f: f.write(model_card(ckpt, row, args.license, folded).encode()))
    check, scale = {}, want.abs().max().item()
    for name, run in runners.items():
        with torch.inference_mode():
            check[name] = (run(x) - want).abs().max().item() / scale
        if check[name] > args.tolerance:
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
    checkpoints.atomic_write(os.path.join(folder, "model.pt2"), lambda f: f.write(program_bytes.getvalue()))
    output = "classification logits (B, classes)" if classifier else \
        "segmentation logits (B, classes, h, w): resize to the image, argmax over classes"
    report = dict(student=args.student, arch=ckpt["recipe"]["arch"], reparameterized=folded, output=output,
                  classes=ckpt["classes"], data_config=ckpt["data_config"],
                  check=dict(images=len(x), max_relative_diff=check), latency_ms=latency, note=note,
                  files=sorted(os.listdir(folder)) + [REPORT])
    checkpoints.atomic_write(os.path.join(folder, REPORT), lambda f: f.write(json.dumps(report, indent=1).encode()))
    return report


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
    p.add_argument("--license", help="the model card's license (a Hub license id: apache-2.0, mit, other, ...); "
                   "yours to choose: the teacher's, the data's and the init weights' terms may bind it")
    p.add_argument("--out", default="runs/demo/export/student_kt_target", help="the folder to write (made "
                   "whole, or a previous export of this script replaced whole)")
    return p


def main(args):
    if args.out.endswith(".pt2"):
        fail(f"--out {args.out}: export.py writes a folder (model.pt2, model.onnx, the timm files, export.json); "
             f"give its name, e.g. {args.out[:-4]}")
    claims.claim(args.out, reads=(args.student, args.split, args.results), marker=REPORT)
    ckpt = checkpoints.load_checkpoint(args.student, kinds=("student",), made_by="finetune.py")
    split = data.read_split(args.split)
    checkpoints.check_same_task(ckpt, args.student, split, args.split)
    row = results_row(args.results, args.student)
    trained = models.load_model(ckpt).eval()  # the training form: what evaluate.py scored
    model, folded = models.deployed(trained)  # the deployed form (a folded copy, where there is anything to fold)
    cfg, classifier = ckpt["data_config"], checkpoints.task(ckpt) == "classification"
    refs = data.part_refs(split, "test")[0][:args.images]
    images = data.Images(refs, None, models.transform(cfg, train=False), args.data_root)
    x = torch.stack([images[i][0] for i in range(len(images))])  # (N, 3, H, W), preprocessed as deployed
    with torch.inference_mode():
        want = trained(x)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    tmp = f"{args.out}.tmp{os.getpid()}"  # the new generation, put in place whole once it is checked
    try:
        os.makedirs(tmp)
        report = write_exports(tmp, program, ckpt, trained, row, args, classifier, folded, x, want, model)
        claims.commit_folder(tmp, args.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed check, an error: nothing of it stays
    claims.release(args.out)
    if report["note"]:
        print(report["note"])
    print(f"wrote {args.out}/ ({', '.join(report['files'])}): the check passed on {len(x)} test images "
          f"({', '.join(f'{n} {d:.1e}' for n, d in report['check']['max_relative_diff'].items())})")
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
