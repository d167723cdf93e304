"""Benchmark: does the last step keep what distillation gave, and how close does distillation come to the
teacher? (issue 29; docs/last_step.md has what it measured.)

On one generated task (`demo`, or `demo-clutter`: 20 classes on clutter, a ResNet-18 student, kt/clutter.py)
it runs the steps in-process as run.sh does (the stand-in VFM, split.py, teacher.py once; then for each of
--seeds: student.py, distill.py with each of --mixes, at the same image budget, and finetune.py variants of
the distilled student, each a candidate for what the finetune takes back, one change at a time). Every
finetune's guard log also carries the student's test top-1 (an oracle the finetune never sees): one run
shows the distilled student (step 0), the finetune without selection (its last weights), the guard's
choice, and what other selection rules would have chosen.

Prints and writes (OUT/last_step.md, OUT/last_step.json): distillation per --mix (student top-1, share of the
teacher: student / teacher top-1, agreement with the teacher on test); the last step per variant (distilled,
last, the guard's choice; mean ± std over seeds and per seed); selection rules (mean and worst change from
the distilled student). Every step's output stays in OUT: a rerun skips what is there.
Run:    OMP_NUM_THREADS=1 python -m bench.last_step --task demo                  (3 seeds: ~10 min on one core)
        OMP_NUM_THREADS=1 python -m bench.last_step --task demo-clutter          (~45 min on one core)
        OMP_NUM_THREADS=1 python -m bench.last_step --task demo --epochs-scale 3 --variants kd kd_frozen_bn_crops \
            --final kd_frozen_bn_crops --out runs/last_step/demo_x3             (3x the distillation budget)
"""
import argparse
import contextlib
import json
import os
import time

import numpy as np
import torch

import distill
import finetune
import split as split_step
import student
import teacher
import transfer_set
from kt import data, guard, models
from kt.progress import read_metrics

# Each task as its preset ran it before issue 29 (presets/demo.sh, presets/demo-clutter.sh), one process at a
# time, no workers; VARIANTS change the finetune from there.
TASKS = {
    "demo": dict(pretrain=("kt.demo", ["--arch", "test_resnet", "--per-class", "100", "--epochs", "15"]),
                 teacher=["--model", "test_resnet", "--img-size", 32, "--epochs", 30, "--lr", 1e-3, "--head-lr", 3e-3,
                          "--layer-decay", 0.75],
                 student=["--model", "test_resnet", "--img-size", 32],
                 distill=["--epochs", 15, "--batch-size", 64, "--min-scale", 0.25],
                 finetune=["--epochs", 20, "--lr", 2e-4]),
    "demo-clutter": dict(pretrain=("kt.clutter", ["--arch", "resnet18", "--per-class", "100", "--epochs", "30"]),
                         teacher=["--model", "resnet18", "--img-size", 32, "--epochs", 30, "--lr", 1e-3,
                                  "--head-lr", 3e-3, "--layer-decay", 0.75],
                         student=["--model", "resnet18", "--img-size", 32],
                         distill=["--epochs", 15, "--batch-size", 64, "--min-scale", 0.25],
                         finetune=["--epochs", 20, "--lr", 2e-4]),
}
# The finetune's candidates, one change each from `kd`, the finetune before issue 29 (--teacher: half the loss
# its soft targets on the labeled views; BatchNorm statistics updated; timm's crops; the task's lr and epochs).
# Every one runs with the guard, which changes nothing of training.
UPDATE = ["--bn-stats", "update"]
VARIANTS = {
    "ce": ["--kd-weight", 0, *UPDATE],                 # the paper's: the labels alone
    "kd": UPDATE,                                      # the teacher's soft targets kept, on the labeled views
    "kd_frozen_bn": ["--bn-stats", "keep"],            # BatchNorm keeps the distilled statistics
    "kd_lr_quarter": ["--lr-scale", 0.25, *UPDATE],    # a quarter of the lr
    "kd_quarter_steps": ["--epochs-scale", 0.25, *UPDATE],  # a quarter of the steps
    "kd_transfer": ["--transfer", "TRANSFER", *UPDATE],  # the KD term on transfer images, as distillation had it
    "kd_distill_crops": ["--min-scale", "DISTILL", *UPDATE],  # the crops distillation used, not timm's 8% ones
    "kd_frozen_bn_crops": ["--bn-stats", "keep", "--min-scale", "DISTILL"],  # the two together: the new default
    "kd_frozen_bn_crops_transfer": ["--bn-stats", "keep", "--min-scale", "DISTILL", "--transfer", "TRANSFER"],
}


def run(module, *argv):
    """A step's main() in-process with command-line arguments, as run.sh would run it."""
    return module.main(module.get_args_parser().parse_args([str(a) for a in argv]))


def made(path, module, *argv):
    """Run a step unless its output is there (a rerun resumes the study)."""
    if not os.path.exists(path):
        run(module, *argv, "--out", path)
    return path


@contextlib.contextmanager
def oracle(test_x, test_y, teacher_test_logits):
    """Every guard measure also gets the student's test top-1 and its agreement with the teacher on the test
    images (what a held-out set as large as the test set would show): logged, never used for a choice."""
    measure = guard.Guard.measure

    def measured(self, step):
        out = measure(self, step)
        logits = guard.logits_of(guard.unwrap(self.model), test_x, self.cfg, self.autocast)
        test = guard.agreement(logits, teacher_test_logits)
        return dict(out, test_top1=100 * float((logits.argmax(-1) == test_y).float().mean()),
                    **{k.replace("guard_", "test_"): v for k, v in test.items()})
    guard.Guard.measure = measured
    try:
        yield
    finally:
        guard.Guard.measure = measure


def test_set(split_path, cfg):
    """The test images in [0, 1] as evaluate.py reads them for a model of data config cfg, and their labels."""
    refs, labels = data.part_refs(data.read_split(split_path), "test")
    images = data.Images(refs, labels, models.transform(cfg, train=False, normalize=False))
    return torch.stack([images[i][0] for i in range(len(images))]), torch.tensor(labels)


def scored(ckpt, test_x, test_y, teacher_logits=None):
    """A checkpoint's test top-1, its agreement with the teacher (%), its logits and distillation's metrics."""
    logits = guard.logits_of(models.load_model(ckpt), test_x, ckpt["data_config"], contextlib.nullcontext)
    metrics = ckpt.get("metrics", {})
    agree = None if teacher_logits is None else guard.agreement(logits, teacher_logits)["guard_agreement"]
    return dict(top1=100 * float((logits.argmax(-1) == test_y).float().mean()), logits=logits, agreement=agree,
                held_out_kd=metrics.get("held_out_kd"), converged=metrics.get("converged"))


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def variant_args(name, task, transfer):
    """A variant's finetune flags: the task's, then the variant's change."""
    args, change = [str(a) for a in TASKS[task]["finetune"]], [str(a) for a in VARIANTS[name]]
    if change and change[0] in ("--lr-scale", "--epochs-scale"):
        flag = "--lr" if change[0] == "--lr-scale" else "--epochs"
        i = args.index(flag)
        value = float(args[i + 1]) * float(change[1])
        args[i + 1], change = str(value if flag == "--lr" else max(1, round(value))), change[2:]
    distill_scale = str(TASKS[task]["distill"][TASKS[task]["distill"].index("--min-scale") + 1])
    return args + [transfer if c == "TRANSFER" else distill_scale if c == "DISTILL" else c for c in change]


def distill_args(args):
    """The task's distillation flags, its epochs times --epochs-scale (every --mix the same image budget)."""
    flags = [str(a) for a in TASKS[args.task]["distill"]]
    i = flags.index("--epochs") + 1
    flags[i] = str(max(1, round(int(flags[i]) * args.epochs_scale)))
    return flags


def study(args):
    """The steps of the study, each made once; -> the results (dict)."""
    task, out = TASKS[args.task], args.out
    os.makedirs(out, exist_ok=True)
    vfm = os.path.join(out, "standin_vfm.pth")
    if not os.path.exists(vfm):
        module, argv = task["pretrain"]
        mod = __import__(module, fromlist=["main"])
        mod.main(mod.get_args_parser().parse_args(argv + ["--out", vfm]))
    split_path = os.path.join(out, "split.json")
    run(split_step, "--dataset", args.task, "--shots", args.shots, "--seed", 0, "--out", split_path)
    T = ["--split", split_path]
    teacher_path = made(os.path.join(out, "teacher.pt"), teacher, *T, "--train-seed", 0, "--weights", vfm,
                        "--workers", 0, *task["teacher"])
    transfer = made(os.path.join(out, "transfer_target.txt"), transfer_set, *T, "--source", "target")
    t_ckpt = load(teacher_path)
    test_x, test_y = test_set(split_path, t_ckpt["data_config"])  # (teacher and student: one architecture here)
    t = scored(t_ckpt, test_x, test_y)
    results = dict(task=args.task, teacher_top1=t["top1"], seeds={})
    for seed in args.seeds:
        d = os.path.join(out, f"s{seed}")
        os.makedirs(d, exist_ok=True)
        start = made(os.path.join(d, "student.pt"), student, *T, "--train-seed", seed, *task["student"])
        per_seed = results["seeds"][str(seed)] = dict(distilled={}, finetuned={})
        for mix in args.mixes:
            t0 = time.time()
            kt = made(os.path.join(d, f"kt_{mix}.pt"), distill, "--teacher", teacher_path, "--student", start,
                      "--transfer", transfer, "--train-seed", seed, "--workers", 0, "--mix", mix,
                      *distill_args(args))
            s = scored(load(kt), test_x, test_y, t["logits"])
            per_seed["distilled"][mix] = {k: v for k, v in s.items() if k != "logits"}
            names = args.variants if mix == args.mixes[0] else args.final
            for name in names:
                ft = os.path.join(d, f"kt_{mix}_{name}.pt")
                if not os.path.exists(ft):
                    with oracle(test_x, test_y, t["logits"]):
                        run(finetune, *T, "--student", kt, "--teacher", teacher_path, "--train-seed", seed,
                            "--workers", 0, *variant_args(name, args.task, transfer), "--out", ft)
                chosen = load(ft)["metrics"]["guard"]
                records = [r for r in read_metrics(ft + ".metrics.jsonl") if "test_top1" in r]
                per_seed["finetuned"][f"{mix}/{name}"] = dict(records=records, guard=chosen)
            print(f"[{args.task} seed {seed} mix {mix}: {time.time() - t0:.0f}s]", flush=True)
    return results


# ------------------------------------------------------------------------------------------ the tables
RULES = {  # how a finetune's weights could be chosen from its logged measures (the oracle is an upper bound)
    "distilled (step 0)": lambda rs, g: rs[0],
    "last (no selection)": lambda rs, g: rs[-1],
    "guard (finetune.py)": lambda rs, g: rs[0] if g["kept"] == "first" else rs[-1],
    "lowest KD on held-out": lambda rs, g: min(rs, key=lambda r: (r["guard_kd"], r["step"])),
    "best agreement on held-out": lambda rs, g: max(rs, key=lambda r: (r["guard_agreement"], -r["step"])),
    "best soft agreement on held-out": lambda rs, g: max(rs, key=lambda r: (r["guard_soft_agreement"], -r["step"])),
    "lowest KD on test images": lambda rs, g: min(rs, key=lambda r: (r["test_kd"], r["step"])),
    "best soft agreement on test images": lambda rs, g: max(rs, key=lambda r: (r["test_soft_agreement"], -r["step"])),
    "oracle: best test top-1": lambda rs, g: max(rs, key=lambda r: (r["test_top1"], -r["step"])),
}


def cell(values, digits=1):
    """Mean ± std over seeds (the std of the seeds, not of the mean)."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def tables(results):
    """The markdown tables of a study."""
    seeds = list(results["seeds"].values())
    teacher_top1 = results["teacher_top1"]
    lines = [f"## {results['task']}: teacher {teacher_top1:.1f} top-1, seeds {', '.join(results['seeds'])}", "",
             "Distillation (test top-1 %; share = student / teacher top-1; agreement with the teacher %):", "",
             "| --mix | distilled top-1 | share of the teacher | agreement | held-out KD | per seed |",
             "|---|---|---|---|---|---|"]
    for mix in seeds[0]["distilled"]:
        runs = [s["distilled"][mix] for s in seeds]
        top1 = [r["top1"] for r in runs]
        lines.append(f"| {mix} | {cell(top1)} | {cell([x / teacher_top1 for x in top1], 3)} | "
                     f"{cell([r['agreement'] for r in runs])} | {np.mean([r['held_out_kd'] for r in runs]):.3f} | "
                     + ", ".join(f"{x:.1f}" for x in top1) + " |")
    lines += ["", "The last step (test top-1 %; each finetune from its seed's distilled student; "
              "change = finetuned - distilled):", "",
              "| finetune | distilled | last (no selection) | change | guard's choice | change "
              "| per seed: last, guard |",
              "|---|---|---|---|---|---|---|"]
    for key in seeds[0]["finetuned"]:
        runs = [s["finetuned"][key] for s in seeds]
        first = [r["records"][0]["test_top1"] for r in runs]
        last = [r["records"][-1]["test_top1"] for r in runs]
        chosen = [RULES["guard (finetune.py)"](r["records"], r["guard"])["test_top1"] for r in runs]
        lines.append(f"| {key} | {cell(first)} | {cell(last)} | {np.mean(np.subtract(last, first)):+.1f} | "
                     f"{cell(chosen)} | {np.mean(np.subtract(chosen, first)):+.1f} | "
                     + ", ".join(f"{a:.1f}/{b:.1f}" for a, b in zip(last, chosen)) + " |")
    lines += ["", "Selection rules over every finetune above (change from the distilled student, test top-1):", "",
              "| rule | mean change | worst change | best change |", "|---|---|---|---|"]
    for name, rule in RULES.items():
        changes = [rule(r["records"], r["guard"])["test_top1"] - r["records"][0]["test_top1"]
                   for s in seeds for r in s["finetuned"].values()]
        lines.append(f"| {name} | {np.mean(changes):+.2f} | {min(changes):+.1f} | {max(changes):+.1f} |")
    return "\n".join(lines) + "\n"


def get_args_parser():
    p = argparse.ArgumentParser("bench.last_step: the last step and distillation's share of the teacher, per seed",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", choices=list(TASKS), default="demo")
    p.add_argument("--shots", type=int, default=10, help="labeled images per class")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (the labels and the "
                   "teacher stay those of seed 0, as run.sh --seeds)")
    p.add_argument("--mixes", nargs="+", default=["none", "mixup", "cutmix"],
                   choices=["none", "mixup", "cutmix", "both"],
                   help="distill.py --mix values; the first one's student gets every --variants finetune")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), help="finetunes")
    p.add_argument("--final", nargs="+", default=["kd", "kd_frozen_bn_crops"], choices=list(VARIANTS),
                   help="the finetunes of the other mixes' students")
    p.add_argument("--epochs-scale", type=float, default=1.0, help="distillation epochs times this, for every mix "
                   "(function matching is patient: Beyer et al. 2022); give it its own --out")
    p.add_argument("--out", default=None, help="default: runs/last_step/TASK")
    return p


def main(args):
    args.out = args.out or os.path.join("runs", "last_step", args.task)
    results = study(args)
    md = tables(results)
    with open(os.path.join(args.out, "last_step.json"), "w") as f:
        json.dump(results, f)
    with open(os.path.join(args.out, "last_step.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
