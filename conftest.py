"""Fixtures and helpers shared by test_all.py: a step in-process (run), its task (make_split, task_args,
seg_args), tiny random models and data (TINY, random_checkpoint, TINY_CLIP, tiny_clip, demo_pool,
_folder_dataset), the teacher cache's arguments (cache_args) and torchrun; the fixtures pipeline, tiny
and seg (the steps run once per test module) and cpu.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import distill
import finetune
import split as split_step
import student
import teacher
import transfer_set
from kt import catalog, checkpoints, models

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--img-size", "32"]


def run(module, *argv):
    """Call a step's main() in-process with command-line arguments, as run.sh would."""
    return module.main(module.get_args_parser().parse_args([str(a) for a in argv]))


def make_split(d, *argv, name="split.json"):
    """split.py in-process: d/name for the settings in argv (kept if there already) -> the steps' --split."""
    run(split_step, *argv, "--out", d / name)
    return ["--split", d / name]


def task_args(d):
    return make_split(d, "--dataset", "demo", "--shots", 4, "--seed", 0)


def seg_args(d, shots=8):
    return make_split(d, "--dataset", "demo-seg", "--shots", shots, "--seed", 0)


def random_checkpoint(path, kind, arch, classes):
    """A step's checkpoint of a random tiny timm model at 32 px (classes: the task's class names)."""
    model, recipe, cfg = models.create_model(arch, len(classes), img_size=32)
    checkpoints.save_checkpoint(dict(kind=kind, recipe=recipe, data_config=cfg, classes=classes,
                              model=model.state_dict(), cost=[]), path)


TINY_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8,
                                              "head_width": 32},
             "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1}}


def tiny_clip(d):
    """A tiny random OpenCLIP config file, d/tiny-clip.json: `open_clip:d/tiny-clip.json` names it."""
    (d / "tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    return d / "tiny-clip.json"


def _folder_dataset(root, train_classes=("cat", "dog"), test_classes=("cat", "dog"), n=3):
    from PIL import Image
    for split, classes in (("train", train_classes), ("test", test_classes)):
        for c in classes:
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(n):
                Image.new("RGB", (20, 20), (40 * i, 100, 7)).save(root / split / c / f"{i}.png")
    return f"folder:{root}"


def demo_pool(folder, n, split="unlabeled", start=0):
    """n demo images saved as PNG files (lossless: a saved test image is a pixel-exact copy)."""
    os.makedirs(folder, exist_ok=True)
    ds = catalog.load_dataset("demo", split)[0]
    paths = []
    for i in range(start, start + n):
        paths.append(os.path.join(folder, f"{split}_{i:04d}.png"))
        ds[i][0].save(paths[-1])
    return paths


def cache_args(d, cache, *extra):
    return ["--teacher", d / "teacher.pt", "--student", d / "student.pt", "--transfer", d / "transfer.txt",
            "--out", cache, "--views", 3, "--topk", 4, "--shard-size", 10, "--workers", 0,
            "--batch-size", 8, *extra]


def torchrun(script, *argv):
    """Run a step under torchrun with 2 CPU processes (gloo); returns its stderr, failing on a non-zero exit."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script, *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # CPU + gloo, also on a 1-GPU machine
    r = subprocess.run(list(map(str, cmd)), cwd=HERE, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.count("wrote") == 1  # rank 0 alone logs and writes
    return r.stderr


# ----------------------------------------------------------------------------------------- fixtures
@pytest.fixture
def cpu(monkeypatch):
    """Run in-process steps on the CPU even on a GPU machine: the test's claims (bitwise equality, fp32
    tolerances) are CPU claims. The CUDA paths have their own tests (test_all.py, section 10)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """teacher -> student -> transfer set -> distill -> finetune, tiny models on the demo data."""
    d = tmp_path_factory.mktemp("run")
    quick = ["--workers", 0]
    run(teacher, *task_args(d), "--model", "test_vit", *TINY, "--weights", "none", "--epochs", 2,
        "--batch-size", 16, *quick, "--out", d / "teacher.pt")
    run(student, *task_args(d), "--model", "test_resnet", *TINY, "--out", d / "student.pt")
    run(transfer_set, *task_args(d), "--source", "target", "--out", d / "transfer.txt")
    run(distill, "--teacher", d / "teacher.pt", "--student", d / "student.pt", "--transfer",
        d / "transfer.txt", "--epochs", 1, "--batch-size", 64, *quick, "--out", d / "kt.pt")
    run(finetune, *task_args(d), "--student", d / "kt.pt", "--epochs", 2, *quick, "--out", d / "kt_ft.pt")
    return d


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 10-class test_vit teacher, a test_resnet student (32 px) and 24 demo transfer images."""
    d = tmp_path_factory.mktemp("speed")
    for kind, arch in (("teacher", "test_vit"), ("student", "test_resnet")):
        torch.manual_seed(0)
        random_checkpoint(d / f"{kind}.pt", kind, arch, [str(c) for c in range(10)])
    (d / "transfer.txt").write_text("\n".join(f"demo:train:{i}" for i in range(24)))
    return d


@pytest.fixture(scope="module")
def seg(tmp_path_factory):
    """The five steps on demo-seg: tiny models, an LR-ASPP student, a linear-head ViT teacher."""
    d = tmp_path_factory.mktemp("seg")
    quick = ["--workers", 0, "--epochs", 1, "--smoothing", 0]
    run(teacher, *seg_args(d), "--model", "test_vit", "--img-size", 64, "--weights", "none", "--batch-size", 4,
        *quick, "--out", d / "teacher.pt")
    run(student, *seg_args(d), "--model", "test_resnet", "--img-size", 64, "--out", d / "student.pt")
    run(transfer_set, *seg_args(d), "--source", "target", "--out", d / "transfer.txt")
    (d / "small.txt").write_text("\n".join((d / "transfer.txt").read_text().split()[:48]))
    return d
