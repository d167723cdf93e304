"""Tests, offline, on generated demo data and tiny random models (CUDA tests skip without a GPU); the
fixtures and the helpers several sections share are in conftest.py.

One section per step, in the order a run goes; each opens with a banner:
   1. the method: the KD loss (per image and per pixel), the top-k and agnostic losses, kt_in_one_file.py
   2. split.py: the label budget, split.json, the paper's split files, datasets by name, masks
   3. teacher.py and student.py: models by name, data configs, transforms, local weights, OpenCLIP, segmenters
   4. transfer_set.py: pools, exact search, retrieval, filters, the embedding cache
   5. distill.py, distill_agnostic.py, cache_teacher.py + distill_cached.py
   6. finetune.py
   7. evaluate.py and export.py
   8. the steps end to end, the demo's stand-in VFM, run.sh
   9. files and failures: resume, one writer, bad input, bad images (one line, nothing lost)
  10. speed and scale: torchrun, no host reads in the step loop, bench.py, the CUDA-only checks

Run: python -m pytest -q test_all.py
"""
import copy
import functools
import glob
import importlib.util
import io
import json
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
import timm

import cache_teacher
import distill
import distill_agnostic
import distill_cached
import evaluate
import export
import finetune
import split as split_step
import student
import teacher
import transfer_set
from bench import speed as bench
from kt import catalog, checkpoints, claims, data, demo, embeddings, knn, masks, models, training
from kt import progress as kt_progress
from kt import guard as kt_guard
from kt.progress import Progress
from conftest import (HERE, TINY, run, make_split, task_args, seg_args, random_checkpoint,
                      TINY_CLIP, tiny_clip, _folder_dataset, demo_pool, cache_args, torchrun)


# ====================================================================================================
# 1. the method: the KD loss (per image and per pixel), the top-k and agnostic losses, kt_in_one_file.py
# ====================================================================================================
# -------------------------------------------------------------------------------------- the KD loss
def test_kd_loss_is_zero_when_logits_match_and_positive_otherwise():
    t = torch.randn(8, 5)
    assert distill.kd_loss(t.clone(), t, temperature=2.0).abs() < 1e-6
    assert distill.kd_loss(torch.randn(8, 5), t, temperature=2.0) > 0


def test_kd_loss_t_squared_scaling_matches_the_analytic_gradient():
    # d/ds [T^2 KL(softmax(t/T) || softmax(s/T))] = T (softmax(s/T) - softmax(t/T)) / B
    s, t = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6)
    for T in (1.0, 2.0, 4.0):
        s.grad = None
        distill.kd_loss(s, t, T).backward()
        expected = T * (torch.softmax(s.detach() / T, -1) - torch.softmax(t / T, -1)) / 4
        torch.testing.assert_close(s.grad, expected, rtol=1e-4, atol=1e-6)


def test_kd_gradients_reach_only_the_student():
    teacher_net, student_net = torch.nn.Linear(10, 3), torch.nn.Linear(10, 3)
    teacher_net.requires_grad_(False)
    x = torch.randn(5, 10)
    with torch.inference_mode():
        t_logits = teacher_net(x)
    distill.kd_loss(student_net(x), t_logits.clone(), 2.0).backward()
    assert student_net.weight.grad is not None and student_net.weight.grad.abs().sum() > 0
    assert teacher_net.weight.grad is None


def test_per_pixel_kd_loss_is_the_same_loss_over_pixels():
    s, t = torch.randn(2, 5, 4, 4), torch.randn(2, 5, 4, 4)
    assert distill.kd_loss(t, t, temperature=3.0).abs() < 1e-6  # zero at a match
    rows = lambda z: z.permute(0, 2, 3, 1).reshape(-1, 5)  # noqa: E731  (each pixel a row of the classic loss)
    for temperature in (1.0, 2.0, 4.0):
        assert torch.allclose(distill.kd_loss(s, t, temperature), distill.kd_loss(rows(s), rows(t), temperature))
    # T^2 scaling: the gradient is T (softmax(s / T) - softmax(t / T)) / pixels, exactly; its size does not
    # shrink as T grows (the 1/T of the softmax is undone)
    s.requires_grad_(True)
    for temperature in (1.0, 4.0, 100.0):
        (g,) = torch.autograd.grad(distill.kd_loss(s, t, temperature), s)
        analytic = temperature * ((s / temperature).softmax(1) - (t / temperature).softmax(1)) / (2 * 4 * 4)
        assert torch.allclose(g, analytic, atol=1e-6) and g.abs().max() > 1e-3
    # the teacher's coarser grid is resized to the student's: a constant teacher map stays that constant
    coarse = torch.randn(2, 5, 1, 1)
    fine = coarse.expand(2, 5, 8, 8)
    assert distill.kd_loss(fine, coarse, 2.0).abs() < 1e-6


# ----------------------------------------------------------------------------------- the top-k loss
def test_topk_loss_equals_the_dense_loss_when_k_is_all_classes():
    s, t = torch.randn(6, 5, requires_grad=True), torch.randn(6, 5)
    for T in (1.0, 3.0):
        prob, cls = t.softmax(-1).topk(5, dim=-1)
        dense, sparse = distill.kd_loss(s, t, T), distill_cached.kd_loss_topk(s, prob, cls, T)
        torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)
        g_dense, = torch.autograd.grad(dense, s)
        g_sparse, = torch.autograd.grad(sparse, s)
        torch.testing.assert_close(g_sparse, g_dense, rtol=1e-4, atol=1e-6)


def test_topk_loss_is_kl_to_the_renormalised_top_k_and_zero_at_the_match():
    t = torch.randn(4, 8)
    prob, cls = t.softmax(-1).topk(3, dim=-1)
    q = torch.zeros(4, 8).scatter(1, cls, prob / prob.sum(-1, keepdim=True))  # sparse target, sums to 1
    s = torch.randn(4, 8)
    expect = (torch.special.xlogy(q, q) - q * s.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(distill_cached.kd_loss_topk(s, prob.half(), cls.short()), expect, rtol=1e-3, atol=1e-3)
    matching = torch.full((4, 8), -30.0).scatter(1, cls, q.gather(1, cls).log())  # student = q
    assert distill_cached.kd_loss_topk(matching, prob, cls).abs() < 1e-4
    assert torch.isfinite(distill_cached.kd_loss_topk(s, torch.tensor([[1.0, 0.0, 0.0]] * 4).half(), cls))


# --------------------------------------------------------------------------- the task-agnostic loss
def test_agnostic_loss_zero_for_identical_normalised_features():
    torch.manual_seed(0)
    feats = torch.randn(8, 16)
    identity = nn.Linear(16, 16)
    with torch.no_grad():
        identity.weight.copy_(torch.eye(16))
        identity.bias.zero_()
    assert abs(distill_agnostic.agnostic_loss(identity(feats), feats).item()) < 1e-6
    # cosine: the scale of either side does not matter, the direction does
    assert abs(distill_agnostic.agnostic_loss(identity(feats), 3 * feats).item()) < 1e-6
    assert distill_agnostic.agnostic_loss(identity(feats), -feats).item() == pytest.approx(2.0, abs=1e-5)


def test_agnostic_loss_gradients_reach_only_student_and_projection():
    torch.manual_seed(0)
    student, vfm, projection = nn.Linear(5, 4), nn.Linear(5, 6), nn.Linear(4, 6)
    x = torch.randn(3, 5)
    loss = distill_agnostic.agnostic_loss(projection(student(x)), vfm(x))  # vfm left with grads on
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projection.parameters())
    assert all(p.grad is None for p in vfm.parameters())


# -------------------------------------------------------------------------------- kt_in_one_file.py
def test_the_one_file_method_has_distill_pys_loss():
    import kt_in_one_file
    torch.manual_seed(0)
    s, t = torch.randn(16, 10) * 3, torch.randn(16, 10) * 3
    for temperature in (1.0, 2.0, 4.0):
        assert torch.equal(kt_in_one_file.kd_loss(s, t, temperature), distill.kd_loss(s, t, temperature))


def test_the_one_file_method_reproduces_teacher_above_kt_above_scratch_on_the_demo(tmp_path):
    """kt_in_one_file.py as its header runs it: the demo's images and stand-in VFM, then its own settings."""
    import kt_in_one_file
    demo.main(demo.get_args_parser().parse_args(["--folder", str(tmp_path / "data")]))
    demo.main(demo.get_args_parser().parse_args(["--out", str(tmp_path / "vfm.pth")]))
    table = run(kt_in_one_file, "--data", tmp_path / "data", "--teacher-weights", tmp_path / "vfm.pth")
    assert table["teacher"] > table["kt"] + 5 > table["scratch"] + 15, table  # the paper's order, with margins
    short = ["--teacher-epochs", 1, "--distill-epochs", 1, "--finetune-epochs", 1]  # its GPU lines: bf16 autocast
    bf16 = run(kt_in_one_file, "--data", tmp_path / "data", "--teacher-weights", tmp_path / "vfm.pth", *short,
               "--amp", "bf16")
    assert all(0 <= v <= 100 for v in bf16.values())
    with kt_in_one_file.precision(torch.device("cpu"), "bf16")():
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.bfloat16
    with kt_in_one_file.precision(torch.device("cpu"), "auto")():  # auto: float32 on the CPU, bf16 on a GPU
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.float32



# ====================================================================================================
# 2. split.py: the label budget, split.json, the paper's split files, datasets by name, masks
# ====================================================================================================
# ------------------------------------------------------------------ the label budget and split.json
def test_label_budget_is_deterministic_balanced_and_disjoint():
    labels = np.repeat(np.arange(5), 20).tolist()
    a, rest = split_step.label_budget(labels, 3, seed=1)
    assert (a, rest) == split_step.label_budget(labels, 3, seed=1)
    assert a != split_step.label_budget(labels, 3, seed=2)[0]
    assert np.bincount(np.asarray(labels)[a]).tolist() == [3] * 5
    assert sorted(a + rest) == list(range(100)) and not set(a) & set(rest)


def test_label_budget_takes_all_of_a_small_class_with_a_warning():
    labels = [0] * 10 + [1] * 2
    with pytest.warns(UserWarning, match="fewer than --shots"):
        labeled, _ = split_step.label_budget(labels, 4, seed=0)
    assert sum(labels[i] == 1 for i in labeled) == 2 and sum(labels[i] == 0 for i in labeled) == 4


def test_a_percentage_budget_takes_that_share_of_every_class(capsys):
    labels = [0] * 200 + [1] * 50 + [2] * 3
    labeled, rest = split_step.label_budget(labels, "10%", seed=0)
    assert np.bincount(np.asarray(labels)[labeled]).tolist() == [20, 5, 1]  # at least one of a small class
    assert sorted(labeled + rest) == list(range(253))
    parser = split_step.get_args_parser()
    assert parser.parse_args(["--shots", "1%"]).shots == "1%" and parser.parse_args(["--shots", "7"]).shots == 7
    for bad in ("150%", "0%", "x%", "0"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--shots", bad])
    assert "'150%' is not a percentage above 0 and at most 100" in capsys.readouterr().err


def test_split_is_recorded_once_and_mismatches_are_refused(tmp_path):
    s = split_step.make_split(tmp_path / "split.json", "demo", 3, 0)
    assert split_step.make_split(tmp_path / "split.json", "demo", 3, 0) == s
    with pytest.raises(SystemExit, match="records"):
        split_step.make_split(tmp_path / "split.json", "demo", 5, 0)
    old = {k: v for k, v in s.items() if k != "files"}  # a split.json of an older version: no file lists
    (tmp_path / "old.json").write_text(json.dumps(old))
    with pytest.raises(SystemExit, match="old.json is not a split file"):
        data.read_split(tmp_path / "old.json")
    assert split_step.make_split(tmp_path / "old.json", "demo", 3, 0) == s  # made again: the same labels
    assert data.part_refs(s, "labeled")[0][:2] == [f"demo:train:{i}" for i in s["labeled"][:2]]


def test_a_split_json_written_by_hand_is_all_a_task_needs(tmp_path):
    """A task of one's own: image files and labels listed in a split.json, no dataset code."""
    from PIL import Image
    files = {"labeled": [], "test": []}
    for part, n in (("labeled", 2), ("test", 2)):
        for c in range(2):
            for i in range(n):
                path = tmp_path / f"{part}_{c}_{i}.png"
                Image.new("RGB", (40, 30), (200 * c, 50, 50)).save(path)
                files[part].append([str(path), c])
    (tmp_path / "split.json").write_text(json.dumps(dict(classes=["red", "green"], files=files)))
    split = ["--split", tmp_path / "split.json"]
    run(teacher, *split, "--model", "test_resnet", *TINY, "--weights", "none", "--epochs", 1, "--workers", 0,
        "--out", tmp_path / "teacher.pt")
    table = run(evaluate, *split, "--workers", 0, "--speed-batch", 0, "--out", tmp_path / "r.json",
                f"teacher={tmp_path / 'teacher.pt'}")
    assert table["teacher"]["test_images"] == 4
    with pytest.raises(SystemExit, match="lists no unlabeled images"):
        run(transfer_set, *split, "--source", "target", "--out", tmp_path / "t.txt")
    assert not (tmp_path / "t.txt").exists()


def test_a_split_json_written_by_hand_is_checked_once_in_one_line(tmp_path):
    """Every way a hand-written split.json can be wrong that once gave a traceback, trained on nothing, scored
    on training images or dropped images from the loss: one line, before any work, nothing written."""
    from PIL import Image
    for name in ("a.png", "b.png", "c.png", "d.png", "pic:train:3"):  # the last a real file named like a reference
        Image.new("RGB", (32, 32), (len(name) * 20, 0, 0)).save(tmp_path / name, format="PNG")
    good = dict(classes=["red", "green"], files=dict(labeled=[["a.png", 0], ["b.png", 1]], test=[["c.png", 0],
                                                                                             ["d.png", 1]]))
    cases = [  # (what is changed, the message)
        (dict(files=dict(good["files"], labeled=[])), "lists no labeled images"),
        (dict(files=dict(good["files"], test=[["a.png", 0], ["d.png", 1]])), "1 images are both labeled and test"),
        (dict(files=dict(good["files"], labeled=[["a.png", -100], ["b.png", 1]])), "has the label -100: its labels are class indices 0-1"),
        (dict(files=dict(good["files"], labeled=[["a.png", 2], ["b.png", 1]])), "has the label 2"),
        (dict(files=dict(good["files"], labeled=[["a.png", 0.0], ["b.png", 1]])), "has the label 0.0"),
        (dict(files=dict(good["files"], labeled=[["a.png", True], ["b.png", 1]])), "has the label True"),
        (dict(files=dict(good["files"], labeled=[["a.png", "1"], ["b.png", 1]])), "has the label '1'"),
        (dict(files=dict(good["files"], test=[["c.png", -1]])), "files.test has the label -1"),
        (dict(files=dict(good["files"], labeled=[["a.png"], ["b.png", 1]])), "is not a list of \\[image, label\\] pairs"),
        (dict(files=dict(good["files"], labeled=[["a.png", 0, 1]])), "is not a list of \\[image, label\\] pairs"),
        (dict(files=dict(good["files"], labeled={"a.png": 0})), "is not a list of \\[image, label\\] pairs"),
        (dict(files=dict(good["files"], labeled=[["a\n.png", 0]])), "references are one-line strings"),
        (dict(files=dict(good["files"], labeled=[["gone.png", 0], ["lost.png", 1]])), "none of its 2 labeled image files"),
        (dict(classes="redgreen"), "classes is not a list of class names"),
        (dict(classes=["red", "red"]), "class 'red' is named twice"),
    ]
    for change, message in cases:
        (tmp_path / "split.json").write_text(json.dumps(dict(good, **change)))
        for module, argv in [(teacher, ["--model", "test_resnet", *TINY, "--weights", "none"]),
                             (evaluate, [f"t={tmp_path / 'none.pt'}"]), (student, ["--model", "test_resnet"])]:
            with pytest.raises(SystemExit, match=message) as e:
                run(module, "--split", tmp_path / "split.json", *argv, "--out", tmp_path / "out.pt")
            assert "\n" not in str(e.value) and not (tmp_path / "out.pt").exists()
    # relative paths are relative to split.json's folder, from any working directory; a file named like a
    # NAME:SPLIT:INDEX reference is that file
    os.makedirs(tmp_path / "elsewhere")
    good["files"]["unlabeled"] = [["pic:train:3", -1]]
    (tmp_path / "split.json").write_text(json.dumps(good))
    split = data.read_split(str(tmp_path / "split.json"))
    assert split["files"]["labeled"][0][0] == str(tmp_path / "a.png")
    assert data.open_image(split["files"]["unlabeled"][0][0]).getpixel((0, 0))[0] == len("pic:train:3") * 20
    (tmp_path / "t.txt").write_text("demo:train:1\n")
    with pytest.raises(SystemExit, match="is .*split.json, an input of this step"):  # an output that is an input
        run(transfer_set, "--split", tmp_path / "split.json", "--source", "target", "--out", tmp_path / "split.json")
    assert json.loads((tmp_path / "split.json").read_text()) == good


# -------------------------------------------------------------------------- the paper's split files
def _paper_layout(root, n_train=6, n_val=2, n_test=3):
    """A dataset as the paper's split files expect it: files anywhere under the dataset's folder, found by
    name, and the files train_full.txt, train_2img_per_class.txt, val.txt, test.txt (`filename,class`)."""
    from PIL import Image
    rows = {"train_full": [], "val": [], "test": []}
    for c, colour in (("forest", (20, 120, 30)), ("river", (30, 60, 200))):
        for part, n in (("train_full", n_train), ("val", n_val), ("test", n_test)):
            for i in range(n):
                name = f"{c.capitalize()}_{part}_{i}.jpg"
                os.makedirs(root / "images" / c, exist_ok=True)
                Image.new("RGB", (24, 24), tuple(v + 5 * i for v in colour)).save(root / "images" / c / name)
                rows[part].append(f"{name},{c}")
    rows["train_2img_per_class"] = [r for r in rows["train_full"] if "_0." in r or "_3." in r]
    os.makedirs(root / "splits", exist_ok=True)
    for part, lines in rows.items():
        (root / "splits" / f"{part}.txt").write_text("\n".join(lines) + "\n")
    return f"folder:{root / 'images'}", root / "splits"


def test_the_papers_split_files_drive_a_run(tmp_path):
    dataset, files = _paper_layout(tmp_path)
    task = make_split(tmp_path, "--dataset", dataset, "--split-files", files, "--budget", "train_2img_per_class")
    run(teacher, *task, "--model", "test_resnet", *TINY, "--weights", "none", "--epochs", 1, "--workers", 0,
        "--out", tmp_path / "teacher.pt")
    split = json.loads((tmp_path / "split.json").read_text())
    assert split["classes"] == ["forest", "river"] and split["budget"] == "train_2img_per_class"
    assert sorted(os.path.basename(p) for p in split["labeled"]) == sorted(
        f"{c}_train_full_{i}.jpg" for c in ("Forest", "River") for i in (0, 3))
    run(transfer_set, *task, "--source", "target", "--out", tmp_path / "transfer.txt")
    unlabeled = (tmp_path / "transfer.txt").read_text().split()
    assert len(unlabeled) == 12 - 4 and not set(unlabeled) & set(split["labeled"])  # train_full minus the budget
    table = run(evaluate, "--split", tmp_path / "split.json", "--workers", 0, "--out",
                tmp_path / "r.json", f"teacher={tmp_path / 'teacher.pt'}", f"copy={tmp_path / 'teacher.pt'}")
    assert table["teacher"]["test_images"] == 6 and "val_top1" in table["teacher"]  # val beside test
    assert table["copy"]["agreement"] == 100.0 and "val top-1" in (tmp_path / "r.md").read_text()
    (files / "test.txt").unlink()  # ImageNet's files: no test.txt, val.txt is the test set
    split = split_step.make_split(tmp_path / "imagenet_split.json", dataset, None, None, split_files=files,
                              budget="train_2img_per_class")
    assert len(split["files"]["test"]) == 4 and "val" not in split["files"]


def test_split_files_that_do_not_match_the_dataset_are_refused(tmp_path):
    dataset, files = _paper_layout(tmp_path)
    with open(files / "val.txt", "a") as f:
        f.write("Forest_missing_1.jpg,forest\nForest_missing_2.jpg,forest\n")
    (files / "broken.txt").write_text("just_a_name.jpg\n")
    for budget, message in [("train_2img_per_class", "2 files of the split files are not under .*Forest_missing_1"),
                            ("train_9img", "no budget train_9img .*choose one of train_2img_per_class, train_full"),
                            ("broken", "1 lines are not `filename,class`")]:
        with pytest.raises(SystemExit, match=message) as e:
            split_step.make_split(tmp_path / "split.json", dataset, None, None, split_files=files, budget=budget)
        assert "\n" not in str(e.value) and not (tmp_path / "split.json").exists()


def test_split_files_find_a_name_in_its_class_folder(tmp_path):
    """Places365's train files repeat names across classes (airfield/00003554.jpg, airplane_cabin/00003554.jpg)."""
    from PIL import Image
    lines = []
    for c in ("airfield", "apartment_building_outdoor"):  # Places365 keeps the second in apartment_building/outdoor
        folder = tmp_path / "places" / "data_256" / c[0] / c.replace("_outdoor", "/outdoor")
        os.makedirs(folder)
        for i in range(3):
            Image.new("RGB", (8, 8)).save(folder / f"0000000{i}.jpg")
            lines.append(f"0000000{i}.jpg,{c}")
    os.makedirs(tmp_path / "files")
    (tmp_path / "files" / "train_full.txt").write_text("\n".join(lines))
    (tmp_path / "files" / "train_1img_per_class.txt").write_text(f"{lines[0]}\n{lines[3]}\n")
    split = split_step.make_split(tmp_path / "split.json", f"folder:{tmp_path / 'places'}", None, None,
                              split_files=tmp_path / "files", budget="train_1img_per_class")
    assert [os.path.relpath(p, tmp_path / "places") for p in split["labeled"]] == [
        "data_256/a/airfield/00000000.jpg", "data_256/a/apartment_building/outdoor/00000000.jpg"]
    assert len(split["files"]["unlabeled"]) == 4


def test_the_papers_places365_files_resolve_with_colliding_class_names(tmp_path):
    """Every name is in every class folder; house is not tree_house, farm not tree_farm; the classes come
    in torchvision's order (by folder path: desert/sand before desert_road); val and test images are flat."""
    from PIL import Image
    folders = dict(house="h/house", tree_house="t/tree_house", beach_house="b/beach_house", farm="f/farm",
                   tree_farm="t/tree_farm", desert_sand="d/desert/sand", desert_road="d/desert_road")
    root, files, train, test = tmp_path / "places365", tmp_path / "files", [], []
    for k, (c, folder) in enumerate(folders.items()):
        os.makedirs(root / "data_256_standard" / folder)
        for i in range(3):  # the same three names in every class folder, each a different picture
            Image.new("RGB", (8, 8), (40 * k, i, 0)).save(root / "data_256_standard" / folder / f"0000000{i}.jpg")
            train.append(f"0000000{i}.jpg,{c}")
        os.makedirs(root / "val_256", exist_ok=True)
        Image.new("RGB", (8, 8), (40 * k, 9, 9)).save(root / "val_256" / f"Places365_val_0000000{k}.jpg")
        test.append(f"Places365_val_0000000{k}.jpg,{c}")
    os.makedirs(files)
    (files / "train_full.txt").write_text("\n".join(train))
    (files / "train_1img_per_class.txt").write_text("\n".join(train[::3]))
    (files / "test.txt").write_text("\n".join(test))
    split = split_step.make_split(tmp_path / "split.json", f"folder:{root}", None, None, split_files=files,
                                  budget="train_1img_per_class.txt")
    assert split["classes"] == ["beach_house", "desert_sand", "desert_road", "farm", "house", "tree_farm", "tree_house"]
    assert split["budget"] == "train_1img_per_class"  # however it was given
    for ref, y in split["files"]["labeled"] + split["files"]["unlabeled"]:
        name = split["classes"][y] if y >= 0 else None
        assert name is None or os.path.dirname(os.path.relpath(ref, root / "data_256_standard")) == folders[name]
    unlabeled = {os.path.relpath(r, root) for r, _ in split["files"]["unlabeled"]}
    assert len(unlabeled) == 14 and "data_256_standard/t/tree_house/00000001.jpg" in unlabeled
    assert [split["classes"][y] for _, y in split["files"]["test"]] == list(folders)


def test_split_files_of_another_task_or_with_a_typo_are_refused(tmp_path):
    """A class only the budget names ('circel'), a name found twice and in no class folder, a line twice:
    one line each, nothing written; fields are stripped ('img, circle') and a byte-order mark is no name."""
    from PIL import Image
    for c in ("circle", "square"):
        os.makedirs(tmp_path / "task" / c)
        for i in range(2):
            Image.new("RGB", (8, 8)).save(tmp_path / "task" / c / f"{c}{i}.png")
    files = tmp_path / "files"
    os.makedirs(files)
    (files / "test.txt").write_text("circle1.png,circle\nsquare1.png,square\n")
    out = tmp_path / "split.json"
    for budget, message in [("circle0.png,circel\nsquare0.png,square\n", "classes \\['circel', 'circle'\\] are named by"),
                            ("circle0.png,circle\ncircle0.png,circle\nsquare0.png,square\n", "names 1 images more than once"),
                            ("missing.png,circle\nsquare0.png,square\n", "not under")]:
        (files / "train_x.txt").write_text(budget)
        with pytest.raises(SystemExit, match=message) as e:
            split_step.make_split(out, f"folder:{tmp_path / 'task'}", None, None, split_files=files, budget="train_x")
        assert "\n" not in str(e.value) and not out.exists()
    (files / "train_x.txt").write_bytes("\ufeffcircle0.png, circle\nsquare0.png ,square\n".encode())
    split = split_step.make_split(out, f"folder:{tmp_path / 'task'}", None, None, split_files=files, budget="train_x")
    assert split["classes"] == ["circle", "square"] and len(split["labeled"]) == 2


# --------------------------------------------------------------------------------- datasets by name
def test_the_papers_datasets_by_name(tmp_path):
    from PIL import Image
    root = tmp_path / "data"
    for split, wnids in (("train", ("n01", "n02")), ("val", ("n01", "n02"))):  # ImageNet's ImageFolder layout
        for w in wnids:
            os.makedirs(root / "imagenet" / split / w)
            for i in range(2):
                Image.new("RGB", (8, 8)).save(root / "imagenet" / split / w / f"{w}_{split}_{i}.JPEG")
    _, labels, classes = catalog.load_dataset("imagenet", "test", str(root))  # the paper tests on ImageNet's val
    assert classes == ["n01", "n02"] and labels == [0, 0, 1, 1]
    os.makedirs(root / "ham10000" / "HAM10000_images_part_1")
    rows = [("ISIC_0000001", "nv"), ("ISIC_0000002", "mel"), ("ISIC_0000003", "nv")]
    (root / "ham10000" / "HAM10000_metadata.csv").write_text(
        "lesion_id,image_id,dx,dx_type\n" + "".join(f"L{i},{r},{dx},histo\n" for i, (r, dx) in enumerate(rows)))
    for r, _ in rows:
        Image.new("RGB", (8, 8)).save(root / "ham10000" / "HAM10000_images_part_1" / f"{r}.jpg")
    ds, labels, classes = catalog.load_dataset("ham10000", "train", str(root))
    assert classes == ["mel", "nv"] and labels == [1, 0, 1] and ds[1][0].size == (8, 8)
    with pytest.raises(SystemExit, match="ham10000 has no test split of its own; use the paper's split files"):
        catalog.load_dataset("ham10000", "test", str(root))


def test_folder_datasets_with_a_wrong_layout_are_refused(tmp_path):
    ok = _folder_dataset(tmp_path / "ok")
    assert catalog.load_dataset(ok, "train")[2] == ["cat", "dog"]
    with pytest.raises(SystemExit, match="has no test/ folder"):
        catalog.load_dataset(f"folder:{tmp_path / 'ok' / 'train'}", "test")
    os.makedirs(tmp_path / "empty" / "train" / "cat")  # an empty class
    _folder_dataset(tmp_path / "empty", train_classes=("dog",))
    with pytest.raises(SystemExit, match="cat"):
        catalog.load_dataset(f"folder:{tmp_path / 'empty'}", "train")
    bad = _folder_dataset(tmp_path / "differ", test_classes=("cat", "cow"))
    with pytest.raises(SystemExit, match="differ from train/ classes"):
        catalog.load_dataset(bad, "test")


def test_a_directory_symlink_loop_counts_each_file_once(tmp_path):
    dataset = _folder_dataset(tmp_path, n=3)
    os.symlink("../cat", tmp_path / "train" / "cat" / "sub")  # train/cat/sub -> train/cat
    _, labels, _ = catalog.load_dataset(dataset, "train")
    assert labels == [0, 0, 0, 1, 1, 1]


def test_test_split_problems_are_refused_before_training(tmp_path):
    no_test = _folder_dataset(tmp_path / "a")
    shutil.rmtree(tmp_path / "a" / "test")
    short = _folder_dataset(tmp_path / "b", test_classes=("cat",))  # dog missing in test
    for dataset, message in [(no_test, "has no test/ folder"), (short, "differ from train/ classes")]:
        with pytest.raises(SystemExit, match=message):
            run(split_step, "--dataset", dataset, "--shots", 1, "--out", tmp_path / "split.json")
        assert not list(tmp_path.glob("teacher.pt*.state")) and not (tmp_path / "split.json").exists()
        assert not (tmp_path / "teacher.pt").exists()


def test_a_segmentation_dataset_of_your_own_by_module(tmp_path, monkeypatch):
    (tmp_path / "myseg.py").write_text(
        "from kt import demo\n"
        "def dataset(split):\n"
        "    return demo.Scenes(split)  # dense = True, .classes, (image, mask) items, .mask(i)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    split = split_step.make_split(tmp_path / "split.json", "py:myseg", 3, 0)
    assert split["dense"] and len(split["labeled"]) == 3
    images = data.part_dataset(split, "labeled", dict(input_size=[3, 32, 32], mean=[0.5] * 3, std=[0.5] * 3), True)
    x, mask = images[(0, 123)]
    assert x.shape == (3, 32, 32) and mask.shape == (32, 32) and int(mask.max()) < len(split["classes"])


# ------------------------------------------------------------------------- Hugging Face datasets (hf:)
@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """The datasets package offline, with a cache of the test's own: nothing real is read, written or reached
    (the package reads its settings at import, so they are set on it as well as in the environment)."""
    datasets = pytest.importorskip("datasets", reason="hf: datasets need the optional package datasets")
    import huggingface_hub
    from kt import hf_datasets
    home = tmp_path / "hf_home"
    for var, value in (("HF_HOME", str(home)), ("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1")):
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    yield datasets
    hf_datasets.splits.cache_clear()  # a Hub id in one test's cache is not another test's


def _png(image, name):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": name}


def _hub_parquet(datasets, root, splits=("train", "test"), per_class=6, unlabeled=(), columns=None, features=None):
    """A dataset in the Hub's parquet layout, root/data/SPLIT-00000-of-00001.parquet: per_class demo images of 4
    classes (the test split's from the demo's test images) as PNG bytes, each with the name of the file it was
    made from, and their ClassLabel (-1 in the `unlabeled` splits); or columns(images, labels)' own columns."""
    os.makedirs(root / "data", exist_ok=True)
    for split in splits:
        source, labels, _ = catalog.load_dataset("demo", "test" if split == "test" else "train")
        picked = [i for c in range(4) for i in np.flatnonzero(np.asarray(labels) == c)[:per_class].tolist()]
        images, ys = [source[i][0] for i in picked], [labels[i] for i in picked]
        rows = columns(images, ys) if columns else dict(
            image=[_png(im, f"{demo.CLASSES[y]}_{split}_{i}.png") for im, y, i in zip(images, ys, picked)],
            label=[-1 if split in unlabeled else y for y in ys])
        features = features or datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=demo.CLASSES[:4]))
        datasets.Dataset.from_dict(rows, features=features).to_parquet(root / "data" / f"{split}-00000-of-00001.parquet")
    return f"hf:{root}"


def test_a_hugging_face_dataset_in_the_hubs_parquet_layout_runs_every_step(hf_home, tmp_path):
    dataset = _hub_parquet(hf_home, tmp_path / "shapes", splits=("train", "validation", "test"))
    task = make_split(tmp_path, "--dataset", dataset, "--shots", 2)
    split = json.loads((tmp_path / "split.json").read_text())
    assert split["classes"] == demo.CLASSES[:4] and len(split["labeled"]) == 8
    assert {p: len(v) for p, v in split["files"].items()} == dict(labeled=8, unlabeled=16, test=24, val=24)
    ref, label = split["files"]["test"][7]  # the dataset's own split name, its folder absolute
    assert ref == f"hf:{tmp_path / 'shapes'}:test:7" and label == 1
    source, labels, _ = catalog.load_dataset("demo", "test")
    assert data.open_image(ref).tobytes() == source[np.flatnonzero(np.asarray(labels) == 1)[1]][0].tobytes()  # pixel for pixel
    run(teacher, *task, "--model", "test_vit", *TINY, "--weights", "none", "--epochs", 1, "--batch-size", 8,
        "--workers", 0, "--out", tmp_path / "teacher.pt")
    run(student, *task, "--model", "test_resnet", *TINY, "--out", tmp_path / "student.pt")
    run(transfer_set, *task, "--source", "target", "--out", tmp_path / "transfer.txt")
    assert (tmp_path / "transfer.txt").read_text().split() == [r for r, _ in split["files"]["unlabeled"]]
    run(distill, "--teacher", tmp_path / "teacher.pt", "--student", tmp_path / "student.pt", "--transfer",
        tmp_path / "transfer.txt", "--epochs", 1, "--batch-size", 8, "--workers", 1,  # a worker opens them too
        "--out", tmp_path / "kt.pt")
    table = run(evaluate, *task, "--workers", 0, "--speed-batch", 0, "--out", tmp_path / "results.json",
                f"teacher={tmp_path / 'teacher.pt'}", f"kt={tmp_path / 'kt.pt'}")
    assert table["kt"]["test_images"] == 24 and "val_top1" in table["kt"]
    # the same dataset as save_to_disk writes it: the same split, image for image
    hf_home.load_dataset(str(tmp_path / "shapes")).save_to_disk(str(tmp_path / "saved"))
    saved = split_step.make_split(tmp_path / "saved.json", f"hf:{tmp_path / 'saved'}", 2, 0)
    assert saved["labeled"] == split["labeled"] and saved["classes"] == split["classes"]
    assert [data.open_image(r).tobytes() for r, _ in saved["files"]["labeled"]] == \
        [data.open_image(r).tobytes() for r, _ in split["files"]["labeled"]]
    # the paper's split files name each image by the file it was made from (its Image feature's path)
    files = tmp_path / "files"
    os.makedirs(files)
    name = hf_home.load_dataset(str(tmp_path / "shapes"))["train"].cast_column(
        "image", hf_home.Image(decode=False))[split["labeled"][0]]["image"]["path"]
    (files / "train_1img.txt").write_text(f"{name},{demo.CLASSES[split['files']['labeled'][0][1]]}\n")
    named = split_step.make_split(tmp_path / "named.json", dataset, None, None, split_files=files, budget="train_1img")
    assert named["files"]["labeled"] == [split["files"]["labeled"][0]] and len(named["files"]["unlabeled"]) == 23
    (files / "train_1img.txt").write_text(f"{name},triangle\n")
    with pytest.raises(SystemExit, match="1 files of the split files are of another class in hf:.*: split files of"):
        split_step.make_split(tmp_path / "wrong.json", dataset, None, None, split_files=files, budget="train_1img")


@pytest.mark.filterwarnings("ignore:.*kind is a column of strings")  # said once a process: asserted once below
def test_hf_datasets_from_the_hub_cache_by_id_with_their_columns_and_as_pools(hf_home, tmp_path):
    """A Hub id read offline from the cache that a download leaves; columns named, or found by their type;
    a pool of any split, which needs no labels; a test split without labels tests on validation."""
    from datasets.packaged_modules.parquet.parquet import Parquet
    _hub_parquet(hf_home, tmp_path / "pq", per_class=3)
    # what load_dataset("someone/shapes") leaves: HF_DATASETS_CACHE/someone___shapes/default/0.0.0/HASH/
    files = {s: [str(tmp_path / "pq" / "data" / f"{s}-00000-of-00001.parquet")] for s in ("train", "test")}
    Parquet(dataset_name="shapes", data_files=files, hash="0123abcd").download_and_prepare()
    cache = hf_home.config.HF_DATASETS_CACHE
    os.makedirs(cache / "someone___shapes")
    shutil.move(glob.glob(str(cache / "shapes" / "default-*"))[0], cache / "someone___shapes" / "default")
    hub = split_step.make_split(tmp_path / "hub.json", "hf:someone/shapes", 1, 0)
    assert hub["files"]["labeled"][0][0].startswith("hf:someone/shapes:train:") and len(hub["files"]["test"]) == 12
    assert data.open_image(hub["files"]["test"][0][0]).size == (32, 32)
    with pytest.raises(SystemExit, match="hf:someone/shapes:other: .*Available configs in the cache: \\['default'\\]"):
        split_step.make_split(tmp_path / "other.json", "hf:someone/shapes:other", 1, 0)
    # two image columns and string labels: --image-column and --label-column choose
    features = hf_home.Features(thumb=hf_home.Image(), photo=hf_home.Image(), kind=hf_home.Value("string"),
                                size=hf_home.Value("int32"))
    dataset = _hub_parquet(hf_home, tmp_path / "two", ("train", "test", "unsupervised"), 3, features=features,
                           columns=lambda images, ys: dict(
                               thumb=[_png(im.resize((8, 8)), None) for im in images],
                               photo=[_png(im, None) for im in images],
                               kind=[demo.CLASSES[y] for y in ys], size=[8] * len(ys)))
    with pytest.raises(SystemExit, match="has no ClassLabel column nor one called label .*--label-column"):
        split_step.make_split(tmp_path / "none.json", dataset, 1, 0)
    with pytest.warns(UserWarning, match="kind is a column of strings, not a ClassLabel"):
        s = split_step.make_split(tmp_path / "cols.json", dataset, 1, 0, image_column="photo", label_column="kind")
    assert s["classes"] == sorted(demo.CLASSES[:4]) and s["image_column"] == "photo"
    kinds = hf_home.load_dataset(str(tmp_path / "two"))["train"]["kind"]
    for ref, label in s["files"]["labeled"]:
        assert ref.startswith(f"hf:{tmp_path / 'two'}#photo:train:")  # the column chosen travels with the image
        assert s["classes"][label] == kinds[int(ref.rsplit(":", 1)[1])]
    assert data.open_image(ref).size == (32, 32) and data.open_image(ref.replace("#photo", "")).size == (8, 8)
    with pytest.raises(SystemExit, match="records other settings .*image_column 'photo' vs 'thumb'"):
        split_step.make_split(tmp_path / "cols.json", dataset, 1, 0, image_column="thumb", label_column="kind")
    with pytest.raises(SystemExit, match="--image-column kind is a Value, not an Image \\(its Image columns: thumb, photo"):
        split_step.make_split(tmp_path / "x.json", dataset, 1, 0, image_column="kind", label_column="kind")
    (tmp_path / "train_x.txt").write_text("a.png,circle\n")
    with pytest.raises(SystemExit, match="its images keep no file names .*use --shots"):
        split_step.make_split(tmp_path / "x.json", dataset, None, None, split_files=tmp_path, budget="train_x",
                              label_column="kind")
    # a pool: any split of the dataset, labeled or not (transfer_set.py --pool hf:DIR:SPLIT)
    run(transfer_set, "--split", tmp_path / "hub.json", "--source", "generic", "--pool", f"{dataset}:unsupervised",
        "--out", tmp_path / "generic.txt")
    assert (tmp_path / "generic.txt").read_text().split() == [f"{dataset}:unsupervised:{i}" for i in range(12)]
    for pool, message in [(f"{dataset}:extra", "has no extra split \\(its splits: train, test, unsupervised\\)"),
                          ("hf:", "an hf: pool names the dataset and one of its splits")]:
        with pytest.raises(SystemExit, match=message):
            run(transfer_set, "--split", tmp_path / "hub.json", "--source", "generic", "--pool", pool,
                "--out", tmp_path / "bad.txt")
    # a test split missing or without labels (the Hub's ImageNet): the validation split is the test set; neither: one line
    unlabeled = _hub_parquet(hf_home, tmp_path / "unlabeled", ("train", "validation", "test"), 2, unlabeled=("test",))
    with pytest.warns(UserWarning, match="its test split has no labels \\(-1\\): the validation split is the test set"):
        s = split_step.make_split(tmp_path / "val.json", unlabeled, 1, 0)
    assert s["files"]["test"][0][0].endswith(":validation:0") and "val" not in s["files"]
    no_test = _hub_parquet(hf_home, tmp_path / "no_test", ("train", "validation"), 2)  # the Hub's Food-101
    with pytest.warns(UserWarning, match="has no test split: the validation split is the test set"):
        s = split_step.make_split(tmp_path / "no_test.json", no_test, 1, 0)
    assert s["files"]["test"][0][0].endswith(":validation:0") and "val" not in s["files"]
    only_train = _hub_parquet(hf_home, tmp_path / "only_train", ("train",), 2)
    with pytest.raises(SystemExit, match="has no test split nor a validation split \\(its splits: train\\); cut "):
        split_step.make_split(tmp_path / "t.json", only_train, 1, 0)
    assert not (tmp_path / "t.json").exists()


def test_an_hf_dataset_that_is_not_there_offline_or_without_the_package_is_one_line(tmp_path, monkeypatch):
    if importlib.util.find_spec("datasets"):  # a process of its own: the package reads its settings at import
        env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   OMP_NUM_THREADS="1")
        r = subprocess.run([sys.executable, "split.py", "--dataset", "hf:nobody/nothing", "--out",
                            str(tmp_path / "split.json")], cwd=HERE, env=env, capture_output=True, text=True)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and not (tmp_path / "split.json").exists()
        assert r.stderr.startswith("error: hf:nobody/nothing is neither a local folder nor in the local cache") and \
            "datasets.load_dataset('nobody/nothing').save_to_disk('DIR')" in r.stderr
    from kt import hf_datasets
    monkeypatch.setitem(sys.modules, "datasets", None)  # as where it is not installed
    hf_datasets.splits.cache_clear()
    with pytest.raises(SystemExit, match="hf: datasets need the optional package datasets: pip install datasets") as e:
        split_step.make_split(tmp_path / "split.json", f"hf:{tmp_path}", 1, 0)
    assert "\n" not in str(e.value) and not (tmp_path / "split.json").exists()


# ------------------------------------------------------------------------------------ masks: ADE20K
def _ade_layout(root, n_train=6, n_val=3, bad=None):
    """ADEChallengeData2016 in miniature: 40x30 JPEGs, masks with 0 ('other') and classes 1-150."""
    from PIL import Image
    base = root / "ADEChallengeData2016"
    rng = np.random.default_rng(0)
    for part, prefix, n in (("training", "ADE_train", n_train), ("validation", "ADE_val", n_val)):
        (base / "images" / part).mkdir(parents=True)
        (base / "annotations" / part).mkdir(parents=True)
        for i in range(1, n + 1):
            name = f"{prefix}_{i:08d}"
            Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(base / "images" / part / f"{name}.jpg")
            mask = rng.integers(0, 151, (30, 40)).astype(np.uint8)
            if bad == name:
                mask = mask[:20]  # the wrong size
            Image.fromarray(mask).save(base / "annotations" / part / f"{name}.png")
    return base


def test_ade20k_layout_and_the_papers_split_files(tmp_path):
    _ade_layout(tmp_path / "data")
    files = tmp_path / "ADE20K"
    files.mkdir()
    (files / "train_full.txt").write_text("".join(f"ADE_train_{i:08d}.jpg\n" for i in range(1, 5)))
    (files / "train_2img.txt").write_text("ADE_train_00000001.jpg\nADE_train_00000003.jpg\n")
    (files / "val.txt").write_text("ADE_train_00000005.jpg\nADE_train_00000006.jpg\n")
    (files / "test.txt").write_text("ADE_val_00000001.jpg\nADE_val_00000002.jpg\nADE_val_00000003.jpg\n")
    split = split_step.make_split(tmp_path / "split.json", "ade20k", 10, 0, tmp_path / "data", files, "train_2img")
    assert split["dense"] and split["reduce_zero_label"] and len(split["classes"]) == 150
    refs, mask_refs = data.part_refs(split, "labeled")
    assert [os.path.basename(r) for r in refs] == ["ADE_train_00000001.jpg", "ADE_train_00000003.jpg"]
    assert all(m.endswith(".png") and "annotations" in m for m in mask_refs)
    assert [os.path.basename(r) for r in data.part_refs(split, "unlabeled")[0]] == \
        ["ADE_train_00000002.jpg", "ADE_train_00000004.jpg"]  # train_full minus the labeled; val stays out
    assert len(data.part_refs(split, "val")[0]) == 2 and len(data.part_refs(split, "test")[0]) == 3
    # reduce_zero_label: ADE's 0 ("other") is not scored, class k is stored as k + 1
    from PIL import Image
    raw = np.asarray(Image.open(mask_refs[0])).astype(np.int64)
    read = masks.open_mask(mask_refs[0], reduce_zero_label=True, num_classes=150).numpy()
    assert (read[raw == 0] == 255).all() and (read[raw > 0] == raw[raw > 0] - 1).all()
    # without split files: --shots N is N images, and the official validation set is the test split
    plain = split_step.make_split(tmp_path / "plain.json", "ade20k", 4, 0, tmp_path / "data")
    assert len(plain["labeled"]) == 4 and len(plain["unlabeled"]) == 2
    with pytest.raises(SystemExit, match="--shots 7: ade20k has 6 train images"):
        split_step.make_split(tmp_path / "more.json", "ade20k", 7, 0, tmp_path / "data")
    assert len(catalog.load_dataset("ade20k", "test", str(tmp_path / "data"))[0]) == 3
    # class names from the devkit's objectInfo150.txt (tab-separated; a name's first synonym), when it is there
    rows = ["1\t0.1576\t11664\t1172\twall", "2\t0.1072\t6046\t612\tbuilding, edifice", "3\t0.0878\t8265\t796\tsky",
            "8\t0.0231\t1906\t199\tbed "] + [f"{i} \t0.0001\t1\t1\tthing{i}, other" for i in range(5, 151)]
    info = tmp_path / "data" / "ADEChallengeData2016" / "objectInfo150.txt"
    info.write_text("Idx\tRatio\tTrain\tVal\tName\n" + "\n".join(rows) + "\n")
    classes = catalog.ade20k(str(tmp_path / "data"), "train").classes
    assert len(classes) == 150 and classes[:5] == ["wall", "building", "sky", "bed", "thing5"]
    info.write_text("Idx\tRatio\tTrain\tVal\tName\n1\t0.1576\t11664\t1172\twall\n")
    with pytest.raises(SystemExit, match="names 1 classes; ADE20K has 150"):
        catalog.ade20k(str(tmp_path / "data"), "train")


def test_bad_masks_are_one_line_and_nothing_is_lost(tmp_path):
    _ade_layout(tmp_path / "data", bad="ADE_train_00000002")
    keep = tmp_path / "teacher.pt"
    keep.write_bytes(b"precious")
    argv = ["--dataset", "ade20k", "--data-root", tmp_path / "data", "--shots", 6, "--out", tmp_path / "split.json"]
    with pytest.raises(SystemExit, match="ADE_train_00000002.png is 40x20, its image 40x30") as e:
        run(split_step, *argv)
    assert "\n" not in str(e.value) and keep.read_bytes() == b"precious" and not (tmp_path / "split.json").exists()
    folder = tmp_path / "shapes"  # a folder dataset whose mask holds a class it does not have
    for part in ("train", "test"):
        (folder / part / "images").mkdir(parents=True)
        (folder / part / "masks").mkdir(parents=True)
        for i in range(2):
            from PIL import Image
            Image.new("RGB", (8, 8)).save(folder / part / "images" / f"{i}.jpg")
            Image.fromarray(np.full((8, 8), 7 if part == "test" and i else 1, np.uint8)).save(
                folder / part / "masks" / f"{i}.png")
    (folder / "classes.txt").write_text("background\nthing\n")
    with pytest.raises(SystemExit, match="1.png holds class 7: classes are 0-1, 255 not labeled"):
        run(split_step, "--dataset", f"folder:{folder}", "--shots", 1, "--out", tmp_path / "f.json")
    assert keep.read_bytes() == b"precious"



# ====================================================================================================
# 3. teacher.py and student.py: models by name, data configs, transforms, local weights, OpenCLIP, segmenters
# ====================================================================================================
def test_transforms_follow_each_models_data_config():
    for arch, size in (("test_vit", 48), ("test_resnet", 40)):
        _, _, cfg = models.create_model(arch, 3, img_size=size)
        gray = __import__("PIL.Image").Image.new("RGB", (70, 90), (128, 128, 128))
        x = models.transform(cfg, train=False)(gray)
        assert x.shape == (3, size, size)
        expect = (128 / 255 - torch.tensor(cfg["mean"])) / torch.tensor(cfg["std"])
        torch.testing.assert_close(x.mean((1, 2)), expect, atol=1e-2, rtol=0)
    raw = torch.rand(2, 3, 64, 64)
    y = models.to_model_input(raw, dict(cfg, mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3]))
    assert y.shape == (2, 3, 40, 40)


def test_segmentation_augmentation_moves_image_and_mask_together():
    from PIL import Image
    left = np.zeros((40, 60), np.uint8)
    left[:, 30:] = 1  # class 1 on the right half, painted white; class 0 black
    img = Image.fromarray(np.stack([left * 255] * 3, -1))
    cfg = dict(input_size=[3, 32, 32], mean=[0.5] * 3, std=[0.5] * 3)
    transform = masks.pair_transform(cfg, train=True)
    from torchvision import tv_tensors
    flipped = 0
    for seed in range(30):
        torch.manual_seed(seed)
        x, m = transform(img, tv_tensors.Mask(torch.from_numpy(left.astype(np.int64))))
        assert x.shape == (3, 32, 32) and m.shape == (32, 32) and m.dtype == torch.int64
        assert set(m.unique().tolist()) <= {0, 1}  # nearest: no label is blended into a new one
        if (m == 0).any() and (m == 1).any():  # the bright pixels are the ones labeled 1
            assert x.mean(0)[m == 1].mean() > x.mean(0)[m == 0].mean()
            flipped += int(m[:, 0].float().mean() > m[:, -1].float().mean())
    assert flipped > 0  # some crops were flipped: class 1 then lies on the left, in the image too


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    run(student, *task_args(tmp_path), "--model", "test_resnet", *TINY, "--out", tmp_path / "s.pt")
    ckpt = torch.load(tmp_path / "s.pt", weights_only=True)  # plain types only: no pickled objects
    assert ckpt["kind"] == "student" and ckpt["recipe"]["arch"] == "test_resnet"
    model = models.load_model(ckpt).eval()
    ref = models.create_model("test_resnet", 10, img_size=32)[0]
    torch.manual_seed(0)  # student.py seeds its init with --seed 0
    ref = models.create_model("test_resnet", 10, img_size=32)[0].eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), ref(x))
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # atomic write left no temp file


def test_local_weights_of_another_architecture_name_the_keys(tmp_path):
    torch.save(models.create_model("test_vit", 5)[0].state_dict(), tmp_path / "vit.pth")
    assert models.create_model("test_vit", 3, weights=str(tmp_path / "vit.pth"), img_size=32)[0]  # new head
    with pytest.raises(SystemExit, match="does not fit ResNet .*missing"):
        models.create_model("test_resnet", 3, weights=str(tmp_path / "vit.pth"))


def test_open_clip_tower_uses_its_own_preprocessing(tmp_path):
    model, recipe, cfg = models.create_model(f"open_clip:{tiny_clip(tmp_path)}", 4)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    assert cfg["input_size"] == [3, 32, 32] and abs(cfg["mean"][0] - 0.4815) < 1e-3  # OpenAI CLIP mean
    ckpt = dict(recipe=recipe, model=model.state_dict())
    torch.testing.assert_close(models.load_model(ckpt)(torch.ones(1, 3, 32, 32)), model(torch.ones(1, 3, 32, 32)))


def test_open_clip_teachers_finetune_with_layer_decay(tmp_path):
    """The paper's second VFM is an OpenCLIP tower: its own ViT, or a timm trunk (ConvNeXt) inside."""
    convnext = dict(TINY_CLIP, vision_cfg={"timm_model_name": "test_convnext", "timm_model_pretrained": False,
                                           "timm_pool": "", "timm_proj": "linear", "image_size": 32})
    for name, cfg in (("vit", TINY_CLIP), ("convnext", convnext)):
        (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
        model = models.create_model(f"open_clip:{tmp_path / name}.json", 10)[0]
        scale = {id(p): g["lr_scale"] for g in teacher.param_groups(model, "finetune", 1e-4, 1e-3, 0.75, 0.05)
                 for p in g["params"]}
        named = dict(model.named_parameters())
        first, last = (named[k] for k in ((["backbone.conv1.weight", "backbone.transformer.resblocks.1.mlp.c_fc.weight"]
                                           if name == "vit" else ["backbone.trunk.stem.0.weight",
                                                                  "backbone.trunk.stages.1.blocks.0.mlp.fc1.weight"])))
        assert len(scale) == len(named) and scale[id(first)] < scale[id(last)] < scale[id(named["head.weight"])] == 10
        out = tmp_path / f"{name}_teacher.pt"
        run(teacher, *task_args(tmp_path), "--model", f"open_clip:{tmp_path / name}.json", "--weights", "none",
            "--epochs", 1, "--batch-size", 20, "--workers", 0, "--out", out)
        torch.manual_seed(0)  # teacher.py's initialisation (--train-seed 0), to compare with what it trained
        start = dict(models.create_model(f"open_clip:{tmp_path / name}.json", 10)[0].named_parameters())
        trained = dict(models.load_model(checkpoints.load_checkpoint(out, kinds=("teacher",))).named_parameters())
        moved = {k: (trained[k] - start[k]).abs().max().item() for k in ("head.weight", [*named][0])}
        assert all(v > 0 for v in moved.values()), moved  # the new head and the tower's lowest layer both trained


# the newest VFMs as a user picks them: each family's tag, its preprocessing, the library that knows it
FAMILIES = [  # (model, mean, std, interpolation, crop): what the tag's own model card would have a user do
    ("vit_small_patch16_dinov3.lvd1689m", 0.485, 0.229, "bicubic", "center"),  # DINOv3: ImageNet's
    ("convnext_tiny.dinov3_lvd1689m", 0.485, 0.229, "bicubic", "center"),
    ("vit_pe_core_tiny_patch16_384.fb", 0.5, 0.5, "bicubic", "center"),  # PE-Core in timm
    ("fastvit_mci0.apple_mclip2_dfndr2b", 0.0, 1.0, "bicubic", "center"),  # MobileCLIP2: none
    ("open_clip:PE-Core-T-16-384/meta", 0.5, 0.5, "bilinear", "squash"),
    ("open_clip:MobileCLIP2-S0/dfndr2b", 0.0, 1.0, "bilinear", "center"),
]


def test_each_vfm_family_preprocesses_as_its_tag_says_also_from_a_local_file(tmp_path):
    """The data config of each family's tag, pinned: also when the weights come from a file (an OpenCLIP model
    from a file used OpenAI CLIP's mean and std whatever its tag); a file without a tag takes what the model's
    tags agree on (SigLIP 2's webli: 0.5), and a model whose tags differ asks for the tag."""
    import open_clip
    for name, mean, std, interpolation, crop in FAMILIES:
        weights = None
        if name.startswith("open_clip:"):  # random weights saved as a downloaded file would be
            weights = tmp_path / f"{name.split('/')[0][10:]}.bin"
            torch.save({k: v.half() for k, v in open_clip.create_model(name[10:].split("/")[0]).state_dict().items()},
                       weights)  # (half precision: half the bytes to write in a test)
        model, _, cfg = models.create_model(name, 3, weights=str(weights) if weights else None, img_size=64)
        assert (cfg["mean"][0], cfg["std"][0], cfg["interpolation"], cfg.get("crop_mode", "center")) == \
            pytest.approx((mean, std, interpolation, crop)), name
        assert evaluate.gflops(model.eval(), cfg, torch.device("cpu")) > 0  # (an attention pool's latent too)
        transform = models.transform(cfg, train=False)  # the eval transform follows it: squash or crop
        resized = [t for t in transform.transforms if type(t).__name__ == "Resize"][0]
        assert (crop == "squash") == isinstance(resized.size, (tuple, list)), name
    from kt import clip_towers
    assert clip_towers.preprocessing("ViT-B-16-SigLIP2", None, "x")["mean"] == [0.5, 0.5, 0.5]
    assert clip_towers.preprocessing("ViT-B-16-SigLIP2", "webli", "x")["resize_mode"] == "squash"
    assert clip_towers.preprocessing("ViT-B-32", None, "x")["mean"][0] == pytest.approx(0.4815, abs=1e-4)
    with pytest.raises(SystemExit, match="tags .* preprocess differently: name the tag your weights are"):
        clip_towers.preprocessing("ViT-L-14", None, "ViT-L-14")  # OpenAI's and others' (0.5) differ
    for name in ("vit_base_patch16_siglip_224.v2_webli", "vit_base_patch16_radio_v3.c_radio", "aimv2_large_patch14_224.apple_pt"):
        assert name.split(".")[0] in timm.list_models()  # the installed timm has them (requirements.txt's floor)


@pytest.mark.parametrize("arch", ["vit_small_patch16_dinov3.lvd1689m", "convnext_tiny.dinov3_lvd1689m",
                                  "vit_base_patch16_siglip_224.v2_webli", "vit_pe_core_small_patch16_384.fb",
                                  "vit_base_patch16_radio_v3.c_radio", "aimv2_large_patch14_224.apple_pt",
                                  "fastvit_mci0.apple_mclip2_dfndr2b"])
def test_each_timm_family_classifies_segments_and_decays_alike(arch):
    """DINOv3 (ViT and ConvNeXt), SigLIP 2, PE-Core, C-RADIO, AIMv2 and MobileCLIP2's FastViT-MCi as a teacher:
    a classifier, a segmenter reading its last map, and layer-wise decay reaching its stem at 0.75^13 (on
    the meta device: shapes and parameter groups, no arithmetic; the rehearsal trains some for real)."""
    with torch.device("meta"):
        classifier, _, cfg = models.create_model(arch, 5, img_size=224)
        segmenter = models.create_model(arch, 5, img_size=224, decoder="linear")[0]
        x = torch.empty(1, 3, 224, 224)
        assert classifier(x).shape == (1, 5) and segmenter(x).shape[:2] == (1, 5) and segmenter(x).shape[2] >= 7
        for model in (classifier, segmenter):
            groups = teacher.param_groups(model, "finetune", 1e-4, 1e-3, 0.75, 0.05)
            assert min(g["lr_scale"] for g in groups) == pytest.approx(0.75 ** 13)


def test_a_name_an_older_library_lacks_says_which_version_has_it(monkeypatch):
    import importlib.metadata
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda p: {"timm": "1.0.9", "open_clip_torch": "2.24.0"}.get(p) or real(p))
    monkeypatch.setattr(timm, "list_models", lambda *a, **k: [])  # as an old timm would answer
    for name, message in [("vit_small_patch16_dinov3.lvd1689m", "timm 1.0.9 does not know .*DINOv3 came with timm 1.0.20"),
                          ("vit_base_patch16_radio_v3.c_radio", "C-RADIO came with timm 1.0.31"),
                          ("resnet_made_up", "unknown model 'resnet_made_up'; try a timm name")]:
        with pytest.raises(SystemExit, match=message) as e:
            models.create_model(name, 3)
        assert "\n" not in str(e.value)
    import open_clip
    monkeypatch.setattr(open_clip, "get_model_config", lambda name: None)
    with pytest.raises(SystemExit, match="open_clip_torch 2.24.0 does not know 'MobileCLIP2-S0': MobileCLIP2 came with "
                                         "open_clip_torch 3.2"):
        models.create_model("open_clip:MobileCLIP2-S0/dfndr2b", 3)


def test_layer_decay_means_the_same_in_every_family():
    """--layer-decay is spread over the depth: the stem of a 12-block ViT, a ConvNeXt (19 levels) and a deeper
    ViT all train at decay^13 of the top lr; the top block just below the head at decay of it, or closer."""
    stems = {}
    for arch, stem in [("vit_small_patch16_dinov3", "patch_embed.proj.weight"), ("convnext_tiny", "stem.0.weight"),
                       ("test_vit", "patch_embed.proj.weight")]:
        model = models.create_model(arch, 5)[0]
        scale = {id(p): g["lr_scale"] for g in teacher.param_groups(model, "finetune", 1e-4, 1e-3, 0.75, 0.05)
                 for p in g["params"]}
        stems[arch] = scale[id(dict(model.named_parameters())[stem])]
    assert stems == pytest.approx({a: 0.75 ** 13 for a in stems})


def test_segmenters_read_timm_and_open_clip_backbones(tmp_path):
    """A timm network, an OpenCLIP ViT tower, and an OpenCLIP tower built on a timm trunk (how open_clip builds
    SigLIP 2, PE-Core and MobileCLIP2): each segments, every parameter used, layer-wise decay, rebuilt."""
    clip = f"open_clip:{tiny_clip(tmp_path)}"
    trunk = dict(TINY_CLIP, vision_cfg={"timm_model_name": "test_vit", "timm_model_pretrained": False,
                                        "timm_pool": "map", "timm_proj": "none", "image_size": 32})
    (tmp_path / "trunk.json").write_text(json.dumps(trunk))
    on_trunk = f"open_clip:{tmp_path / 'trunk.json'}"
    for arch, decoder, grid in (("test_resnet", "lraspp", 8), ("test_vit", "linear", 4), (clip, "linear", 4),
                                (on_trunk, "linear", 2)):
        kw = dict(img_size=64) if arch == "test_vit" else {}
        model, recipe, _ = models.create_model(arch, 3, decoder=decoder, **kw)
        x = torch.randn(2, 3, 64 if not arch.startswith("open_clip") else 32, 64 if not arch.startswith("open_clip") else 32)
        assert model(x).shape == (2, 3, grid, grid)
        model(x).sum().backward()  # every parameter is used (DDP needs it): the classifier was pruned away
        assert not [n for n, p in model.named_parameters() if p.grad is None]
        groups = teacher.param_groups(model, "finetune", 1e-4, 1e-3, 0.75, 0.05)  # layer-wise lr decay
        assert len({g["lr_scale"] for g in groups}) > 2
        rebuilt = models.load_model(dict(recipe=recipe, model=model.state_dict()))
        assert torch.equal(rebuilt.eval()(x), model.eval()(x))



# ====================================================================================================
# 4. transfer_set.py: pools, exact search, retrieval, filters, the embedding cache
# ====================================================================================================
def run_ts(tmp_path, *extra, cache=None, out="out/transfer.txt"):
    """Run the step in-process on demo (1 shot: 10 queries) -> (transfer list lines, report or None).

    The embedding cache is shared by the tests of a session (the queries and the 400 test images are
    embedded once), except where a test names its own."""
    cfg = tiny_clip(tmp_path)
    out = tmp_path / out
    # random embeddings of a random net are all alike (cos ~0.9): only true copies pass 0.999
    argv = [*map(str, make_split(tmp_path, "--dataset", "demo", "--shots", 1)),
            "--embed", f"open_clip:{cfg}", "--embed-pretrained", "none", "--cache-dir", str(tmp_path / cache if cache else tmp_path.parent / "shared-cache"),
            "--workers", "0", "--batch-size", "64", "--shard-size", "64", "--dedup-threshold", "0.999",
            "--leak-threshold", "0.999", "--out", str(out), *map(str, extra)]
    transfer_set.main(transfer_set.get_args_parser().parse_args(argv))
    rep = out.with_suffix(".report.json")
    return out.read_text().splitlines(), json.loads(rep.read_text()) if rep.exists() else None


# -------------------------------------------------------------------------------- sources and pools
def test_target_and_generic_sources_on_demo(tmp_path):
    lines, rep = run_ts(tmp_path, "--source", "target")
    split = json.loads((tmp_path / "split.json").read_text())
    assert lines == [f"demo:train:{i}" for i in split["unlabeled"]] and len(lines) == 1200 - 10 and rep is None
    lines, rep = run_ts(tmp_path, "--source", "target,generic", "--pool", "demo:unlabeled")
    assert len(lines) == 1190 + 2000 and lines[-1] == "demo:unlabeled:1999" and rep["dropped"]["unreadable"] == 0


def test_tar_shard_pool(tmp_path):
    imgs = [im for im, _ in (catalog.load_dataset("demo", "unlabeled")[0][i] for i in range(6))]
    os.makedirs(tmp_path / "shards")

    def add(tf, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))

    for s in range(2):  # img2dataset / webdataset layout: NNNNN.tar holding KEY.jpg + KEY.json
        with tarfile.open(tmp_path / f"shards/{s:05d}.tar", "w") as tf:
            for j in range(3):
                b = io.BytesIO()
                imgs[3 * s + j].save(b, format="JPEG", quality=95)
                add(tf, f"{s}{j:04d}.jpg", b.getvalue())
                add(tf, f"{s}{j:04d}.json", b"{}")
            if s == 1:
                add(tf, "10002x.jpg", b"")  # a zero-byte member
    lines, rep = run_ts(tmp_path, "--source", "retrieval", "--pool", str(tmp_path / "shards"), "--k", "10")
    assert len(lines) == 6 and all(".tar::" in r and r.endswith(".jpg") for r in lines)
    assert rep["dropped"]["unreadable"] == 1 and rep["unreadable_files"][0][0].endswith("00001.tar::10002x.jpg")
    assert data.open_image(lines[0]).size == (32, 32)
    globbed, _ = run_ts(tmp_path, "--source", "generic", "--pool", str(tmp_path / "shards/*.tar"))
    assert sorted(globbed) == sorted(lines)


def test_bad_files_are_skipped_counted_listed(tmp_path):
    pool = tmp_path / "pool"
    good = demo_pool(pool, 6)
    buf = io.BytesIO()
    catalog.load_dataset("demo", "unlabeled")[0][7][0].resize((128, 128)).save(buf, format="JPEG")
    (pool / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (pool / "zero.jpg").write_bytes(b"")
    (pool / "notes.jpg").write_text("not an image")
    (pool / "sidecar.json").write_text("{}")  # not an image extension: not part of the pool
    bad = sorted(str(pool / n) for n in ["truncated.jpg", "zero.jpg", "notes.jpg"])
    lines, rep = run_ts(tmp_path, "--source", "retrieval", "--pool", str(pool), "--k", "20")
    assert sorted(lines) == sorted(good)
    assert rep["dropped"]["unreadable"] == 3 and sorted(r for r, _ in rep["unreadable_files"]) == bad
    # the same pool as a list of paths (relative ones too, plus a missing file), generic, in workers
    (tmp_path / "list.txt").write_text("\n".join(["pool/" + os.path.basename(good[0])] + good[1:] + bad
                                                 + [str(pool / "missing.png")]) + "\n")
    lines, rep = run_ts(tmp_path, "--source", "generic", "--pool", str(tmp_path / "list.txt"), "--workers", "2")
    assert lines == good and rep["dropped"]["unreadable"] == 4


def test_an_embedding_cache_is_remade_when_broken_or_when_its_images_change(tmp_path):
    """A truncated shard is remade (not a traceback); an image replaced at the same path is embedded anew
    (the cache is keyed by each file's size and time too); the temp files of a killed writer go."""
    pool = tmp_path / "pool"
    paths = demo_pool(pool, 8)
    lines, rep = run_ts(tmp_path, "--source", "retrieval", "--pool", str(pool), "--k", "3", cache="cache")
    shard = os.path.join(rep["cache"][2], "00000.npy")
    whole = open(shard, "rb").read()
    open(shard, "wb").write(whole[:100])
    open(os.path.join(rep["cache"][2], "00000.npy.tmp999999999"), "wb").write(b"left by a killed writer")
    again, rep2 = run_ts(tmp_path, "--source", "retrieval", "--pool", str(pool), "--k", "3", cache="cache")
    assert again == lines and open(shard, "rb").read() == whole and rep2["cache"] == rep["cache"]
    assert not glob.glob(os.path.join(rep["cache"][2], "*.tmp*"))
    catalog.load_dataset("demo", "unlabeled")[0][50][0].save(paths[0])  # another picture, the same path
    os.utime(paths[0], ns=(1, 1))
    _, rep3 = run_ts(tmp_path, "--source", "retrieval", "--pool", str(pool), "--k", "3", cache="cache")
    assert rep3["cache"][2] != rep["cache"][2]


def test_empty_transfer_set_fails_and_keeps_out(tmp_path):
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool/zero.jpg").write_bytes(b"")
    (tmp_path / "out").mkdir()
    (tmp_path / "out/transfer.txt").write_text("demo:train:0\n")
    for source in ["generic", "retrieval"]:
        with pytest.raises(SystemExit) as e:
            run_ts(tmp_path, "--source", source, "--pool", str(tmp_path / "pool"))
        assert e.value.code not in (0, None) and "empty" in str(e.value.code)
    assert (tmp_path / "out/transfer.txt").read_text() == "demo:train:0\n"
    assert not (tmp_path / "out/transfer.report.json").exists()
    with pytest.raises(SystemExit):
        run_ts(tmp_path, "--source", "target,webscale")


# ----------------------------------------------------------------------- exact search and retrieval
def brute_force(q, p, k):
    """Reference top-k: full score matrix, sorted by (score desc, index asc)."""
    s = q @ p.T
    order = np.stack([np.lexsort((np.arange(len(p)), -row))[:k] for row in s])
    return np.take_along_axis(s, order, 1), order


def test_search_exact_with_ties_and_small_shards():
    rng = np.random.default_rng(0)
    # small integers: every dot product is exact in float32, so ties are true ties
    p = rng.integers(-2, 3, (50, 8)).astype(np.float32)
    p[30:40] = p[5]  # ten more copies of row 5: ties across shards
    p[45] = p[12]
    q = np.concatenate([rng.integers(-2, 3, (6, 8)), p[[5, 12]], np.zeros((1, 8))]).astype(np.float32)  # zeros: all tie
    for k, shard in [(7, 3), (1, 50), (20, 7), (60, 16)]:  # k larger than a shard, than the pool
        chunks = [(p[a:a + shard], np.arange(a, min(a + shard, len(p)))) for a in range(0, len(p), shard)]
        s, i = knn.search(q, chunks, k, torch.device("cpu"))
        ref_s, ref_i = brute_force(q, p, k)
        assert s.shape == (len(q), min(k, len(p)))
        np.testing.assert_array_equal(i.numpy(), ref_i)
        np.testing.assert_array_equal(s.numpy(), ref_s)


def test_topk_lowest_breaks_ties_by_column():
    s = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0, 2.0], [5.0, 5.0, 5.0, 5.0, 5.0, 5.0]])
    v, c = knn.topk_lowest(s, 2)
    assert sorted(c[0].tolist()) == [1, 2] and sorted(c[1].tolist()) == [0, 1]


def test_every_query_gets_its_k_images():
    top_i = np.array([[0, 1, 2, 3, 4, 5], [0, 1, 6, 7, 8, 9], [9, 8, 7, 1, 0, 2]])  # overlapping neighbours
    mine = transfer_set.balance(top_i, np.array([0, 1, 2, 4, 5, 6, 7, 8, 9]), 2)  # 3 was filtered out
    assert [len(m) for m in mine] == [2, 2, 2] and len({c for m in mine for c in m}) == 6
    assert mine == [[0, 1], [6, 7], [9, 8]]  # in rounds, each query its next-best neighbour still free


def test_retrieval_on_a_pool_stays_balanced(tmp_path):
    lines, rep = run_ts(tmp_path, "--source", "retrieval", "--pool", "demo:unlabeled", "--k", "7",
                        "--dedup-threshold", "auto", "--leak-threshold", "auto")
    assert rep["short_queries"] == 0 and set(rep["images_per_query"]["per_query"].values()) == {7}
    assert rep["kept"] == len(lines) == 10 * 7 and rep["thresholds"]["calibrated"] == [True, True]
    assert 0.95 <= rep["thresholds"]["leak"] < 1


def test_total_sets_an_equal_number_of_neighbours_per_query(tmp_path):
    cfg = tiny_clip(tmp_path)
    run(transfer_set, *seg_args(tmp_path, shots=4), "--source", "labeled,retrieval", "--pool", "demo:unlabeled",
        "--embed", f"open_clip:{cfg}", "--embed-pretrained", "none", "--total", 20, "--workers", 0,
        "--cache-dir", tmp_path / "cache", "--out", tmp_path / "t.txt")
    refs = (tmp_path / "t.txt").read_text().split()
    report = json.loads((tmp_path / "t.report.json").read_text())
    assert report["k"] == 4 and len(refs) == 4 + 4 * 4  # the 4 queries, then ceil(20 / 4) - 1 = 4 each
    assert refs[:4] == data.part_refs(data.read_split(tmp_path / "split.json"), "labeled")[0]


@pytest.mark.parametrize("encoder", ["teacher", "timm"])
def test_a_teacher_or_a_timm_vfm_embeds_images_for_retrieval(tmp_path, encoder):
    """--embed teacher:PATH (the finetuned teacher's pooled features) or timm:NAME (a timm VFM as pretrained,
    here from a local weights file): every query gets its k images, the cache holds that model's embeddings."""
    random_checkpoint(tmp_path / "teacher.pt", "teacher", "test_vit", [str(c) for c in range(10)])
    torch.manual_seed(1)
    vfm = models.create_model("test_vit", 1)[0]
    torch.save(vfm.state_dict(), tmp_path / "vfm.pth")
    spec, extra = (f"teacher:{tmp_path / 'teacher.pt'}", []) if encoder == "teacher" else \
        ("timm:test_vit", ["--embed-weights", tmp_path / "vfm.pth"])
    demo_pool(tmp_path / "pool", 30)
    lines, rep = run_ts(tmp_path, "--source", "retrieval", "--pool", tmp_path / "pool", "--k", 2, "--embed", spec,
                        *extra, "--leak-threshold", 2, "--dedup-threshold", 0.99999, cache="cache")
    assert rep["embed"] == spec and rep["short_queries"] == 0 and rep["kept"] == len(lines) == 10 * 2
    z = np.load(glob.glob(str(tmp_path / "cache/pool-*/00000.npy"))[0])
    ckpt = checkpoints.load_checkpoint(tmp_path / "teacher.pt")
    model, cfg = (models.load_model(ckpt), ckpt["data_config"]) if encoder == "teacher" else \
        (vfm, models.create_model("test_vit", 1)[2])
    ref = data.open_image(sorted(glob.glob(str(tmp_path / "pool/*.png")))[0])
    transform = models.transform(cfg, train=False)
    with torch.no_grad():  # the first pool image's row: that model's pooled features, unit length
        want = torch.nn.functional.normalize(models.image_embedding(model.eval(), transform(ref)[None]).float(), dim=-1)
    np.testing.assert_allclose(z[0].astype(np.float32), want[0].numpy(), atol=2e-3)


def test_a_segmentation_teacher_embeds_images_for_retrieval(seg):
    encoder = embeddings.Encoder(f"teacher:{seg / 'teacher.pt'}")
    z = encoder.fn(torch.rand(2, 3, 64, 64))
    assert z.shape == (2, 64)  # test_vit's width: its last map, averaged over the patches


# ------------------------------------------------------------------------------------------ filters
def test_duplicate_and_leak_filters(tmp_path):
    pool = tmp_path / "pool"
    paths = demo_pool(pool, 8)
    shutil.copy(paths[0], pool / "z_copy.png")  # same bytes
    from PIL import Image
    Image.open(paths[1]).save(pool / "z_same_pixels.bmp")  # other bytes, same pixels: exact too
    px = np.asarray(Image.open(paths[2])).copy()
    px[0, 0] = px[0, 0] ^ 1  # one pixel off by one: a near-duplicate
    Image.fromarray(px).save(pool / "z_tweak.png")
    leaks = demo_pool(pool, 2, split="test", start=3)  # target test images in the pool
    lines, rep = run_ts(tmp_path, "--source", "retrieval", "--pool", str(pool), "--k", "20")
    assert rep["dropped"] == dict(exact_duplicates=2, near_duplicates=1, leaks=2, unreadable=0)
    assert rep["retrieved"] == 13 and rep["kept"] == len(lines) == 8
    assert not set(leaks) & set(lines)
    assert sum(p in lines for p in [paths[0], str(pool / "z_copy.png")]) == 1
    assert sum(p in lines for p in [paths[1], str(pool / "z_same_pixels.bmp")]) == 1
    assert sum(p in lines for p in [paths[2], str(pool / "z_tweak.png")]) == 1


def test_retrieval_filters_mean_near_copies_whatever_the_encoder():
    """A finetuned teacher puts a whole class above 0.95 cosine: fixed thresholds would call most of the pool
    a test leak. Calibrated ones ('auto') flag what is closer than distinct test images come to each other."""
    rng, cpu_device = np.random.default_rng(0), torch.device("cpu")

    def near_the_class(n):  # distinct images of one class, as a finetuned teacher embeds them
        z = 3.0 + 0.4 * rng.normal(size=(n, 32))
        return (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float16)
    test_z, pool_z = near_the_class(300), near_the_class(400)
    pool_z[7] = test_z[3]  # one true copy of a test image in the pool
    distinct = (test_z.astype(np.float32) @ test_z.astype(np.float32).T)[np.triu_indices(300, 1)]
    assert np.mean(distinct > 0.95) > 0.5  # most distinct pairs: above the old fixed threshold
    t = transfer_set.threshold("auto", test_z, cpu_device)
    cand, hashes = np.arange(400), {i: str(i) for i in range(400)}
    _, leak, _, _ = transfer_set.near_copies(cand, pool_z, hashes, test_z, t, 2.0, cpu_device)
    assert leak[7] and leak.sum() <= 0.03 * 400  # the copy, and few others: not the class
    _, fixed_leak, _, _ = transfer_set.near_copies(cand, pool_z, hashes, test_z, 0.95, 2.0, cpu_device)
    assert fixed_leak.sum() > 0.5 * 400  # what a fixed 0.95 did


# ------------------------------------------------------------------------------ the embedding cache
def test_resume_after_kill_matches_clean_run(tmp_path, monkeypatch):
    demo_pool(tmp_path / "pool", 40)
    args = ["--source", "retrieval", "--pool", str(tmp_path / "pool"), "--k", "5", "--shard-size", "16",
            "--leak-threshold", "2"]  # no leak check: no test split to embed in each of three caches
    real_save, saved = embeddings.save_shard, []

    def dying_save(d, s, z, meta):  # the "kill": dies after two finished pool shards
        if os.path.basename(d).startswith("pool-") and sum(x[0] == "pool" for x in saved) == 2:
            raise KeyboardInterrupt
        saved.append((os.path.basename(d).split("-")[0], s))
        real_save(d, s, z, meta)

    monkeypatch.setattr(embeddings, "save_shard", dying_save)
    with pytest.raises(KeyboardInterrupt):
        run_ts(tmp_path, *args, cache="cache")
    assert not (tmp_path / "out/transfer.txt").exists()
    pool_dir = next(p for p in (tmp_path / "cache").iterdir() if p.name.startswith("pool-"))
    stamps = {f: f.stat().st_mtime_ns for f in pool_dir.iterdir()}
    assert len(stamps) == 4  # shards 0 and 1: .npy + .json each

    saved.clear()
    monkeypatch.setattr(embeddings, "save_shard", lambda d, s, z, m: (saved.append(s), real_save(d, s, z, m)))
    lines, rep = run_ts(tmp_path, *args, cache="cache")
    assert saved == [2]  # queries, test split and pool shards 0-1 were not recomputed
    assert all(f.stat().st_mtime_ns == t for f, t in stamps.items())
    clean, clean_rep = run_ts(tmp_path, *args, cache="cache2", out="clean/transfer.txt")
    assert lines == clean and rep["dropped"] == clean_rep["dropped"] and len(lines) == rep["kept"] > 0
    assert rep["similarity"] == clean_rep["similarity"]
    assert (tmp_path / "out/transfer.png").exists()



# ---------------------------------------------------------------- web-scale pools (--pool emb:DIR)
def _optional_all(*packages):
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    return pytest.mark.skipif(bool(missing), reason=f"the optional package(s) {', '.join(missing)} not installed "
                                                     "(.ci/run installs them)")


def _web_pool(root, layout, sizes, dim=16, seed=0, urls=None, key="l14_img"):
    """A pool of published embeddings, unit rows in files of `sizes` rows, with their metadata, in LAION's
    (clip-retrieval: img_emb/img_emb_N.npy + metadata/metadata_N.parquet, N not zero-padded) or DataComp's
    (<stem>.npz + <stem>.parquet) layout -> all rows in id order (the files in name order) and their urls."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng, blocks = np.random.default_rng(seed), []
    names = [str(n) for n in range(len(sizes))]  # 0 1 2 ... 10: "10" sorts before "2"
    for name, n in zip(names, sizes):
        z = rng.normal(size=(n, dim)).astype(np.float32)
        z = (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float16)
        first = sum(len(b[1]) for b in blocks)
        url = list(urls[first:first + n]) if urls else [f"http://127.0.0.1:1/{name}_{i}.jpg" for i in range(n)]
        blocks.append((name, z, url))
    for name, z, url in blocks:
        table = dict(url=url, caption=[f"a picture {u}" for u in url], key=[f"{name}{i:06d}" for i in range(len(z))])
        if layout == "laion":
            os.makedirs(root / "img_emb", exist_ok=True), os.makedirs(root / "metadata", exist_ok=True)
            np.save(root / "img_emb" / f"img_emb_{name}.npy", z)
            pq.write_table(pa.table(table), root / "metadata" / f"metadata_{name}.parquet")
        else:
            os.makedirs(root, exist_ok=True)
            np.savez(root / f"{int(name):08d}.npz", **{key: z, "b32_img": z[:, :8]})
            table = dict(uid=table["key"], url=url, text=table["caption"], sha256=[f"sha-{u}" for u in url])
            pq.write_table(pa.table(table), root / f"{int(name):08d}.parquet")
    order = sorted(blocks, key=lambda b: f"img_emb_{b[0]}.npy") if layout == "laion" else blocks
    return np.concatenate([b[1] for b in order]), [u for b in order for u in b[2]]


@_optional_all("pyarrow")
def test_published_embedding_pools_stream_in_both_layouts_and_find_the_exact_neighbours(tmp_path):
    from kt import web_pools
    for layout, spec in (("laion", "emb:{}"), ("datacomp", "emb:{}:l14_img")):
        root = tmp_path / layout
        z, urls = _web_pool(root, layout, [30, 20, 25, 5, 1, 7, 3, 9, 11, 13, 17])  # 11 files: 10 before 2
        pool = web_pools.EmbeddingPool(spec.format(root))
        pool.check_metadata()
        assert pool.size == len(z) == 141 and pool.dim == 16
        q = z[[3, 77, 140]].astype(np.float32) + 0.01 * np.random.default_rng(1).normal(size=(3, 16))
        s, i = knn.search(q / np.linalg.norm(q, axis=1, keepdims=True), pool(), 5, torch.device("cpu"), chunk=7)
        want = brute_force((q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32), z.astype(np.float32), 5)
        assert np.array_equal(i.numpy(), want[1]) and i[:, 0].tolist() == [3, 77, 140]  # itself, then its nearest
        meta = pool.metadata([140, 3])
        assert meta[140]["url"] == urls[140] and meta[3]["url"] == urls[3] and meta[3]["caption"] == f"a picture {urls[3]}"
        rows, identity = pool.rows([140, 3])
        assert np.array_equal(rows, z[[140, 3]])
        assert identity[3] == (urls[3] if layout == "laion" else f"sha-{urls[3]}")  # DataComp: sha256
    with pytest.raises(SystemExit, match="name the embeddings of the npz files, e.g. emb:.*:l14_img"):
        web_pools.EmbeddingPool(f"emb:{tmp_path / 'datacomp'}")
    import pyarrow as pa
    import pyarrow.parquet as pq  # a metadata file of another length: its urls would be other rows'
    pq.write_table(pa.table(dict(url=["x"] * 3)), tmp_path / "laion/metadata/metadata_2.parquet")
    with pytest.raises(SystemExit, match="metadata_2.parquet has 3 rows for the 25 embeddings .*: a misaligned pool"):
        web_pools.EmbeddingPool(f"emb:{tmp_path / 'laion'}").check_metadata()
    os.remove(tmp_path / "laion/metadata/metadata_2.parquet")
    with pytest.raises(SystemExit, match="has no metadata beside it"):
        web_pools.EmbeddingPool(f"emb:{tmp_path / 'laion'}")


def _scan_rank(rank, port, d):
    """One of two gloo ranks: its own files of the pool, the top-k gathered (see the test below)."""
    from kt import web_pools
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    pool = web_pools.EmbeddingPool(f"emb:{d}")
    q = np.load(os.path.join(d, "queries.npy"))
    s, i = knn.gather_ranks(*knn.search(q, pool(rank, 2), 6, torch.device("cpu")), 6)
    torch.save(dict(s=s, i=i), os.path.join(d, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@_optional_all("pyarrow")
def test_the_exact_scan_split_over_two_ranks_gives_one_processs_answer(tmp_path):
    from kt import web_pools
    import socket
    z, _ = _web_pool(tmp_path, "laion", [9, 1, 14, 6, 3])
    z[10] = z[11]  # a tie across files: broken by the lower id, whichever rank holds it
    np.save(tmp_path / "img_emb/img_emb_2.npy", z[10:24])
    q = np.concatenate([z[[0, 10, 23]], np.random.default_rng(2).normal(size=(2, 16)).astype(np.float16)])
    np.save(tmp_path / "queries.npy", q)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(_scan_rank, args=(port, str(tmp_path)), nprocs=2)
    one = knn.search(q, web_pools.EmbeddingPool(f"emb:{tmp_path}")(), 6, torch.device("cpu"))
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert torch.equal(got["i"], one[1]) and torch.equal(got["s"], one[0])


@_optional_all("pyarrow", "faiss")
def test_an_ivf_index_searched_everywhere_is_the_exact_answer_and_another_pools_is_refused(tmp_path):
    import faiss
    from kt import web_pools
    z, _ = _web_pool(tmp_path / "pool", "laion", [200, 150, 150])
    index = faiss.index_factory(16, "IVF8,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(z.astype(np.float32))
    index.add(z.astype(np.float32))
    faiss.write_index(index, str(tmp_path / "pool/knn.index"))
    (tmp_path / "pool/index_infos.json").write_text(json.dumps({"index_param": "nprobe=8"}))  # nprobe = nlist
    pool = web_pools.EmbeddingPool(f"emb:{tmp_path / 'pool'}")
    q = z[[5, 250, 499]].astype(np.float32)
    scan, recall = web_pools.faiss_scan(str(tmp_path / "pool/knn.index"), pool, q, torch.device("cpu"))
    assert recall == 1.0 and torch.equal(scan(q, None, 10, None)[1], knn.search(q, pool(), 10, torch.device("cpu"))[1])
    small = faiss.IndexFlatIP(16)
    small.add(z[:100].astype(np.float32))
    faiss.write_index(small, str(tmp_path / "other.index"))
    with pytest.raises(SystemExit, match="holds 100 vectors of 16 dimensions, the pool 500 of 16: an index of another pool"):
        web_pools.faiss_scan(str(tmp_path / "other.index"), pool, q, torch.device("cpu"))
    sparse = faiss.index_factory(16, "IVF64,Flat", faiss.METRIC_INNER_PRODUCT)  # lists of ~8, one probed: ids -1
    sparse.train(z.astype(np.float32))
    sparse.add(z.astype(np.float32))
    faiss.write_index(sparse, str(tmp_path / "sparse.index"))
    (tmp_path / "pool/index_infos.json").write_text(json.dumps({"index_param": "nprobe=1"}))
    scan, _ = web_pools.faiss_scan(str(tmp_path / "sparse.index"), pool, q, torch.device("cpu"))
    assert (scan(q, None, 40, None)[1] == -1).any()
    every = lambda top_s, top_i: transfer_set.candidates(top_s, top_i)[0]  # no filter: every id found
    mine, depth = transfer_set.retrieve(q, pool, 20, every, torch.device("cpu"), scan)
    assert depth < pool.size and all(0 <= c < pool.size for m in mine for c in m)  # -1 is no row; not 500 deep
    for bad, message in [("", "is not a readable faiss index"), ("garbage", "is not a readable faiss index")]:
        (tmp_path / "bad.index").write_text(bad)
        with pytest.raises(SystemExit, match=message):
            web_pools.faiss_scan(str(tmp_path / "bad.index"), pool, q, torch.device("cpu"))
    with pytest.raises(SystemExit, match="--index .*nope.index is not there: give a faiss index of the pool, or --autofaiss"):
        run_ts(tmp_path, "--source", "retrieval", "--pool", f"emb:{tmp_path / 'pool'}", "--download", tmp_path / "d",
               "--index", tmp_path / "nope.index")
    npy = tmp_path / "pool/img_emb/img_emb_1.npy"
    npy.write_bytes(npy.read_bytes()[:-100])  # a download cut short: the header is whole, the rows are not
    with pytest.raises(SystemExit, match="img_emb_1.npy is cut short .* download it again"):
        web_pools.EmbeddingPool(f"emb:{tmp_path / 'pool'}")


def _tool(name, env):
    for cmd in (os.environ.get(env), os.path.join(HERE, f".venv-{name}/bin/{name}"), name):
        if cmd and shutil.which(cmd):
            return shutil.which(cmd)
    return None


@_optional_all("pyarrow", "faiss")
@pytest.mark.skipif(_tool("autofaiss", "KT_AUTOFAISS") is None, reason="autofaiss is not installed (its own "
                    "environment: .ci/run makes .venv-autofaiss; or set KT_AUTOFAISS)")
def test_autofaiss_builds_an_index_of_the_pool_in_its_row_order(tmp_path):
    from kt import web_pools
    z, _ = _web_pool(tmp_path, "laion", [40, 30, 20, 10, 5, 5, 5, 5, 5, 5, 70])  # "10" sorts before "2"
    pool = web_pools.EmbeddingPool(f"emb:{tmp_path}")
    web_pools.build_index(pool, str(tmp_path / "index/knn.index"), _tool("autofaiss", "KT_AUTOFAISS"))
    q = z[[0, 100, 199]].astype(np.float32)
    scan, recall = web_pools.faiss_scan(str(tmp_path / "index/knn.index"), pool, q, torch.device("cpu"))
    assert recall >= 0.9 and scan(q, None, 1, None)[1][:, 0].tolist() == [0, 100, 199]
    with pytest.raises(SystemExit, match="autofaiss reads folders of .npy files"):
        _web_pool(tmp_path / "dc", "datacomp", [10])
        web_pools.build_index(web_pools.EmbeddingPool(f"emb:{tmp_path / 'dc'}:l14_img"), str(tmp_path / "x.index"), "x")


def _img2dataset():
    return _tool("img2dataset", "KT_IMG2DATASET")


@_optional_all("pyarrow")
@pytest.mark.skipif(_img2dataset() is None, reason="img2dataset is not installed (its own environment: "
                    ".ci/run makes .venv-img2dataset; or set KT_IMG2DATASET)")
@pytest.mark.parametrize("layout", ["laion", "datacomp"])
def test_retrieval_from_published_embeddings_downloads_only_what_it_keeps(tmp_path, layout):
    """Images served on 127.0.0.1, their embeddings in a LAION- or DataComp-layout pool: transfer_set.py
    retrieves from the embeddings, img2dataset fetches the kept rows (404s refilled from each query's
    reserve), and distill.py trains on the shards."""
    import http.server
    import threading
    from kt import embeddings as kt_embeddings
    cfg = tiny_clip(tmp_path)
    os.makedirs(tmp_path / "web")
    ds = catalog.load_dataset("demo", "unlabeled")[0]
    names = [f"img{i:03d}.jpg" for i in range(60)]
    for i, n in enumerate(names):
        ds[i][0].resize((64, 64)).save(tmp_path / "web" / n, quality=95)
    encoder = kt_embeddings.Encoder(f"open_clip:{cfg}", pretrained="none")
    with torch.no_grad():
        x = torch.stack([encoder.transform(ds[i][0].resize((64, 64))) for i in range(60)])
        z = torch.nn.functional.normalize(encoder.fn(x).float(), dim=-1).half().numpy()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "web"))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: handler(*a))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        urls = [f"{base}/{n}" if i % 7 else f"{base}/gone_{n}" for i, n in enumerate(names)]  # 1 in 7 is a 404
        import pyarrow as pa
        import pyarrow.parquet as pq
        os.makedirs(tmp_path / "pool/img_emb"), os.makedirs(tmp_path / "pool/metadata")
        for f, (a, b) in enumerate([(0, 25), (25, 60)]):
            if layout == "laion":
                np.save(tmp_path / f"pool/img_emb/img_emb_{f}.npy", z[a:b])
                pq.write_table(pa.table(dict(url=urls[a:b], caption=names[a:b], key=names[a:b])),
                               tmp_path / f"pool/metadata/metadata_{f}.parquet")
            else:  # the duplicate url of row 1 (row 0's) is an exact duplicate by its sha256
                np.savez(tmp_path / f"pool/{f:08d}.npz", l14_img=z[a:b], b32_img=z[a:b, :8])
                pq.write_table(pa.table(dict(uid=names[a:b], url=urls[a:b], text=names[a:b],
                                             sha256=[f"sha-{u}" for u in urls[a:b]])), tmp_path / f"pool/{f:08d}.parquet")
        (tmp_path / "pool/pool.json").write_text(json.dumps(dict(model=f"open_clip:{cfg}", key="l14_img")))
        lines, rep = run_ts(tmp_path, "--source", "retrieval", "--pool", f"emb:{tmp_path / 'pool'}", "--k", 3,
                            "--embed", f"open_clip:{cfg}", "--download", tmp_path / "downloads", "--img2dataset",
                            _img2dataset(), "--download-args", "--processes_count 1 --thread_count 4 --resize_mode no "
                            "--timeout 5 --retries 0", cache="cache")
    finally:
        server.shutdown()
    assert rep["failed_downloads"] > 0 and rep["downloaded"] == len(lines) >= 10 and rep["short_queries"] == 0
    assert all(".tar::" in r for r in lines) and data.open_image(lines[0]).size == (64, 64)
    import pyarrow.parquet as pq
    asked = pq.read_table(tmp_path / "out/transfer.parquet").to_pylist()
    assert {"url", "caption", "pool_key", "pool_row", "score", "query", "image"} <= set(asked[0])
    assert all((r["image"] is None) == ("/gone_" in r["url"]) for r in asked)  # every 404 missing, every other one there
    run(distill, "--teacher", tiny_teacher(tmp_path), "--student", tmp_path / "student.pt", "--transfer",
        tmp_path / "out/transfer.txt", "--epochs", 1, "--batch-size", 4, "--workers", 0, "--out", tmp_path / "kt.pt")
    lineage = torch.load(tmp_path / "kt.pt", weights_only=True)["lineage"]
    assert lineage["transfer_images"] + lineage["held_out_images"] == len(lines)
    with pytest.raises(SystemExit, match="makes 32-d embeddings, .* holds 16-d ones"):  # another model's pool
        _web_pool(tmp_path / "other", "laion", [10])
        run_ts(tmp_path, "--source", "retrieval", "--pool", f"emb:{tmp_path / 'other'}", "--download",
               tmp_path / "d2", "--img2dataset", _img2dataset(), cache="cache")
    pixels = lambda refs: [np.asarray(data.open_image(r)).tobytes() for r in refs]
    kept = pixels(lines)
    _web_pool(tmp_path / "dead", "laion", [40], dim=32)  # every url on a port nobody listens on
    with pytest.raises(SystemExit, match="none of the [0-9]+ images retrieval kept could be downloaded") as e:
        run_ts(tmp_path, "--source", "retrieval", "--pool", f"emb:{tmp_path / 'dead'}", "--k", 3, "--embed",
               f"open_clip:{cfg}", "--download", tmp_path / "downloads", "--img2dataset", _img2dataset(),
               "--download-args", "--processes_count 1 --thread_count 4 --timeout 2 --retries 0", cache="cache")
    assert "\n" not in str(e.value) and (tmp_path / "out/transfer.txt").read_text().split() == lines
    assert pixels(lines) == kept  # the list kept is whole: its images are all there
    assert not list((tmp_path / "downloads").glob("*.tmp*"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: handler(*a))  # a second list, same folder
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        _web_pool(tmp_path / "pool2", "laion", [30], dim=32, urls=[f"{base}/{n}" for n in names[:30]])
        second, _ = run_ts(tmp_path, "--source", "retrieval", "--pool", f"emb:{tmp_path / 'pool2'}", "--k", 2, "--embed",
                           f"open_clip:{cfg}", "--download", tmp_path / "downloads", "--img2dataset", _img2dataset(),
                           "--download-args", "--processes_count 1 --thread_count 4 --timeout 5 --retries 0",
                           cache="cache", out="out/second.txt")
    finally:
        server.shutdown()
    assert second and pixels(lines) == kept and not set(second) & set(lines)  # the first list's images untouched


def tiny_teacher(d):
    """A random 10-class test_vit teacher and test_resnet student for the demo's classes, at 32 px."""
    for kind, arch in (("teacher", "test_vit"), ("student", "test_resnet")):
        random_checkpoint(d / f"{kind}.pt", kind, arch, list(demo.CLASSES))
    return d / "teacher.pt"


def test_the_papers_transfer_lists_resolve_by_name_in_a_local_pool(tmp_path, capsys):
    """--source named --names FILE: names of the pool's images (by file name, stem, or the end of their path),
    in their order; a name the pool lacks is refused with a count and the first few, a name two images carry
    with both, a name listed twice is taken once and said."""
    paths = demo_pool(tmp_path / "yfcc", 6)
    names = [os.path.basename(paths[3]), os.path.splitext(os.path.basename(paths[0]))[0], "yfcc/" +
             os.path.basename(paths[5]), os.path.basename(paths[3])]
    (tmp_path / "list.txt").write_text("\n".join(names) + "\n")
    lines, _ = run_ts(tmp_path, "--source", "labeled,named", "--names", tmp_path / "list.txt", "--pool", tmp_path / "yfcc")
    assert lines[-3:] == [paths[3], paths[0], paths[5]] and len(lines) == 10 + 3
    assert "1 lines repeat a name; each image is taken once" in capsys.readouterr().err
    (tmp_path / "list.txt").write_text("\n".join(names + ["gone1.jpg", "gone2.jpg"]))
    with pytest.raises(SystemExit, match="2 of the 5 images --names .* lists are not in --pool .*gone1.jpg"):
        run_ts(tmp_path, "--source", "named", "--names", tmp_path / "list.txt", "--pool", tmp_path / "yfcc")
    os.makedirs(tmp_path / "two/a"), os.makedirs(tmp_path / "two/b")
    for sub, name in [("a", "0001.png"), ("b", "0001.png"), ("a", "0002.png"), ("a", "0002.jpg"), ("a", "x.png")]:
        shutil.copy(paths[0], tmp_path / "two" / sub / name)
    for name, message in [("0001.png", "'0001.png' names 2 images .*a/0001.png and .*b/0001.png"),
                          ("0002", "'0002' names 2 images .*a/0002.jpg and .*a/0002.png"),
                          ("b/x.png", "1 of the 1 images .* are not in --pool")]:  # not a/x.png by its file name
        (tmp_path / "list.txt").write_text(name + "\n")
        with pytest.raises(SystemExit, match=message):
            run_ts(tmp_path, "--source", "named", "--names", tmp_path / "list.txt", "--pool", tmp_path / "two")
    (tmp_path / "list.txt").write_text("b/0001.png\n")  # its folder makes it one image
    assert run_ts(tmp_path, "--source", "named", "--names", tmp_path / "list.txt", "--pool", tmp_path / "two")[0] == \
        [str(tmp_path / "two/b/0001.png")]


# ====================================================================================================
# 5. distill.py, distill_agnostic.py, cache_teacher.py + distill_cached.py
# ====================================================================================================
# --------------------------------------------------------------------------------------- distill.py
def test_distillation_logs_the_loss_on_held_out_images(tiny, tmp_path, cpu, capsys):
    """Is distillation done? The KD loss on a few transfer images it never trains on says so at each log."""
    (tmp_path / "transfer.txt").write_text("\n".join(f"demo:train:{i}" for i in range(120)))  # 5% = 6 held out
    args = ["--teacher", tiny / "teacher.pt", "--student", tiny / "student.pt", "--transfer", tmp_path / "transfer.txt",
            "--epochs", 2, "--batch-size", 16, "--workers", 0, "--save-every", 6, "--log-every", 3]
    run(distill, *args, "--out", tmp_path / "kt.pt")
    ckpt = torch.load(tmp_path / "kt.pt", weights_only=True)
    assert ckpt["lineage"]["held_out_images"] == 6 and ckpt["cost"][-1]["steps"] == 2 * (120 - 6) // 16
    assert math.isfinite(ckpt["metrics"]["held_out_kd"]) and capsys.readouterr().err.count("held out kd") == 5  # 3 6 9 12 14
    records = kt_progress.read_metrics(tmp_path / "kt.pt.metrics.jsonl")  # the same logs, and the curve's start
    assert [r["step"] for r in records] == [0, 3, 6, 9, 12, 14] and all("held_out_kd" in r for r in records)
    assert records[-1]["held_out_kd"] == ckpt["metrics"]["held_out_kd"] and records[-1]["images"] == 14 * 16
    run(distill, *args, "--holdout", 0, "--out", tmp_path / "all.pt")
    assert torch.load(tmp_path / "all.pt", weights_only=True)["lineage"]["held_out_images"] == 0


def _logged(tmp_path, tiny, *log):
    """distill.py on the tiny task with --log: its metrics file's records."""
    (tmp_path / "transfer.txt").write_text("\n".join(f"demo:train:{i}" for i in range(64)))
    run(distill, "--teacher", tiny / "teacher.pt", "--student", tiny / "student.pt", "--transfer",
        tmp_path / "transfer.txt", "--epochs", 2, "--batch-size", 16, "--workers", 0, *log, "--out", tmp_path / "kt.pt")
    return kt_progress.read_metrics(tmp_path / "kt.pt.metrics.jsonl")


def _optional(package):
    return pytest.mark.skipif(importlib.util.find_spec(package) is None,
                              reason=f"the optional package {package} is not installed (.ci/run installs it)")


@_optional("tensorboard")
def test_tensorboard_gets_the_metrics_files_values(tiny, tmp_path, cpu):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    records = _logged(tmp_path, tiny, "--log", "tensorboard")
    events = EventAccumulator(str(tmp_path / "tensorboard/kt"))
    events.Reload()
    for key in ("loss", "held_out_kd", "lr", "images"):
        want = [(r["step"], r[key]) for r in records if key in r]
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in want] and [v for _, v in got] == pytest.approx([v for _, v in want])


@_optional("wandb")
def test_wandb_logs_offline_without_a_network(tiny, tmp_path, cpu, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is the default without a key
    monkeypatch.setenv("WANDB_SILENT", "true")
    _logged(tmp_path, tiny, "--log", "wandb")
    from kt.loggers import _out_id
    run_file, = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")  # offline: for `wandb sync` later
    gen = torch.load(tmp_path / "kt.pt", weights_only=True)["cost"][-1]["generation"]
    assert run_file.name == f"run-{_out_id(str(tmp_path / 'kt.pt'))}-{gen}.wandb"  # a resumed run continues it
    assert all(key in run_file.read_bytes() for key in (b"held_out_kd", b"loss", b"images_per_s"))


@_optional("mlflow")
def test_mlflow_gets_the_metrics_files_values(tiny, tmp_path, cpu, monkeypatch):
    import mlflow
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    records = _logged(tmp_path, tiny, "--log", "mlflow")
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run_info, = client.search_runs([client.get_experiment_by_name("vfm-kt").experiment_id])
    history = client.get_metric_history(run_info.info.run_id, "loss")
    assert [m.step for m in history] == [r["step"] for r in records if "loss" in r]
    assert [m.value for m in history] == pytest.approx([r["loss"] for r in records if "loss" in r])
    assert run_info.info.status == "FINISHED" and run_info.data.params["--epochs"] == "2"


def _curves(folder, out="kt.pt"):
    """What a training into folder/out left in every sink: its metrics file's values, its TensorBoard
    scalars, and the loss history of each MLflow run not deleted (steps and values)."""
    import mlflow
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    keys = ("step", "images", "loss", "lr", "held_out_kd")
    metrics = [{k: r.get(k) for k in keys} for r in kt_progress.read_metrics(folder / f"{out}.metrics.jsonl")]
    events = EventAccumulator(str(folder / "tensorboard" / out.removesuffix(".pt")))
    events.Reload()
    tensorboard = [(e.step, e.value) for e in events.Scalars("loss")]
    client = mlflow.tracking.MlflowClient(f"sqlite:///{folder}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("vfm-kt").experiment_id])  # active runs only
    mlflow_runs = [[(m.step, m.value) for m in client.get_metric_history(r.info.run_id, "loss")] for r in runs]
    return metrics, tensorboard, mlflow_runs


@_optional("tensorboard")
@_optional("mlflow")
def test_a_redo_into_the_same_out_equals_a_fresh_run_in_every_sink(tiny, tmp_path, cpu, monkeypatch):
    """A training redone from step 0 into an existing --out (a changed input, --force) starts its metrics
    file, TensorBoard folder and MLflow run anew: what it leaves is what the same training leaves in a new
    folder, and so is its convergence mark."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "transfer.txt").write_text("\n".join(f"demo:train:{i}" for i in range(64)))
    base = ["--teacher", tiny / "teacher.pt", "--student", tiny / "student.pt", "--transfer", tmp_path / "transfer.txt",
            "--batch-size", 16, "--workers", 0, "--log-every", 1, "--log", "tensorboard,mlflow"]
    for folder, epochs in [("redone", 3), ("redone", 1), ("fresh", 1)]:
        (tmp_path / folder).mkdir(exist_ok=True)
        run(distill, *base, "--epochs", epochs, "--out", tmp_path / folder / "kt.pt")
    redone, fresh = _curves(tmp_path / "redone"), _curves(tmp_path / "fresh")
    assert redone == fresh and len(fresh[0]) == 4 and len(fresh[2]) == 1  # steps 0..3 logged, one MLflow run
    marks = [torch.load(tmp_path / f / "kt.pt", weights_only=True)["metrics"]["converged"] for f in ("redone", "fresh")]
    assert marks[0] == marks[1]
    generations = {r["generation"] for r in kt_progress.read_metrics(tmp_path / "redone/kt.pt.metrics.jsonl")}
    cost = torch.load(tmp_path / "redone/kt.pt", weights_only=True)["cost"][-1]
    assert generations == {cost["generation"]}  # the checkpoint names the lines of its own training


@_optional("tensorboard")
@_optional("mlflow")
def test_a_resume_after_a_kill_rewinds_every_sink_to_the_resumed_step(tiny, tmp_path, cpu, monkeypatch):
    """Killed after logging past its last state, a training resumed from that state drops what lies past it
    in the metrics file, TensorBoard and MLflow alike: they end as an uninterrupted run's."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "transfer.txt").write_text("\n".join(f"demo:train:{i}" for i in range(64)))
    argv = ["--teacher", tiny / "teacher.pt", "--student", tiny / "student.pt", "--transfer", tmp_path / "transfer.txt",
            "--batch-size", 8, "--epochs", 2, "--workers", 0, "--log-every", 1, "--save-every", 5, "--resume",
            "--log", "tensorboard,mlflow"]
    for folder in ("killed", "whole"):
        (tmp_path / folder).mkdir()
    real_log = Progress._log

    def killed_at_step_8(self):
        real_log(self)
        if self.step == 8:
            raise KeyboardInterrupt  # SIGKILL: the state is step 5's, the sinks have 6, 7 and 8 too
    monkeypatch.setattr(Progress, "_log", killed_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        run(distill, *argv, "--out", tmp_path / "killed/kt.pt")
    monkeypatch.undo()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert max(s for s, _ in _curves(tmp_path / "killed")[2][0]) == 8
    run(distill, *argv, "--out", tmp_path / "killed/kt.pt")  # resumed at step 5
    run(distill, *argv, "--out", tmp_path / "whole/kt.pt")
    killed, whole = _curves(tmp_path / "killed"), _curves(tmp_path / "whole")
    assert killed == whole and [r["step"] for r in whole[0]] == list(range(15))


@_optional("wandb")
def test_wandb_offline_runs_follow_the_generation(tiny, tmp_path, cpu, monkeypatch):
    """Offline W&B: one local run per generation of OUT; a redo removes the earlier generation's run."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    for _ in range(2):
        _logged(tmp_path, tiny, "--log", "wandb")
    gen = torch.load(tmp_path / "kt.pt", weights_only=True)["cost"][-1]["generation"]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].name.endswith(gen)


@_optional("mlflow")
def test_two_steps_logging_to_a_new_mlflow_database_at_once_both_run(tmp_path):
    """Two trainings start together on a new SQLite database: without a lock both would create its tables."""
    code = ("import sys; from kt.loggers import MLflow; m = MLflow(sys.argv[1], {'--x': 1}, 'g', 0, [], False); "
            "m.log({'step': 1, 'loss': 0.5}); m.close()")
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/new.db", PYTHONPATH=HERE)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / f"{i}.pt")], env=env, cwd=HERE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(3)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    import mlflow
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path}/new.db")
    assert len(client.search_runs([client.get_experiment_by_name("vfm-kt").experiment_id])) == 3


@_optional("tensorboard")
def test_a_logger_folder_that_cannot_be_made_is_one_line_before_any_work(tiny, tmp_path, cpu, monkeypatch):
    (tmp_path / "tensorboard").write_text("a file where the folder goes")
    loaded = []
    monkeypatch.setattr(models, "load_model", lambda *a: loaded.append(a) or pytest.fail("loaded a model"))
    with pytest.raises(SystemExit, match="cannot make a folder of --log, .*tensorboard/kt") as e:
        run(distill, "--teacher", tiny / "teacher.pt", "--student", tiny / "student.pt", "--transfer",
            tiny / "transfer.txt", "--log", "tensorboard", "--out", tmp_path / "kt.pt")
    assert "\n" not in str(e.value) and not loaded


def test_an_unknown_or_missing_logger_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    for argv, message in [(["--log", "neptune"], "neptune: --log takes a comma list of tensorboard, wandb, mlflow"),
                          (["--log", "tensorboard"], "needs tensorboard: pip install tensorboard")]:
        real = importlib.util.find_spec  # as if tensorboard were not installed
        monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "tensorboard" else real(n, *a))
        with pytest.raises(SystemExit):
            distill.get_args_parser().parse_args([*argv, "--out", str(tmp_path / "kt.pt")])
        assert message in capsys.readouterr().err
        monkeypatch.undo()
    assert not list(tmp_path.iterdir())


def test_a_distillation_that_has_not_converged_says_so_and_its_row_is_marked(tiny, tmp_path, cpu, capsys):
    """The rule (docs/files.md): the held-out KD loss still falling over the last half of the steps, by more than
    15% of its whole decrease. A curve made to fall steadily is flagged, a flat end is not."""
    assert kt_progress.still_falling([(s, 1 - s / 100) for s in range(0, 101, 10)])  # straight down: not done
    assert not kt_progress.still_falling([(s, max(0.2, 1 - s / 40)) for s in range(0, 101, 10)])  # flat from 32
    assert kt_progress.still_falling([(0, 1), (10, 0.5)]) is None  # too few logs to tell
    progress = Progress(str(tmp_path / "run.pt"), model=None, optimizer=None, scaler=None, total=100)
    kt_progress.write_metrics(progress.metrics, [dict(step=s, held_out_kd=1 - s / 200) for s in range(0, 101, 10)])
    assert kt_progress.converged(progress, "held_out_kd", "held-out KD loss", "try more --epochs") is False
    assert "not converged: the held-out KD loss was still falling at the end (1.0000 -> 0.5000" in capsys.readouterr().err
    records = _logged(tmp_path, tiny)  # distill.py records its verdict; evaluate.py marks a row of it
    assert len(records) > 4 and isinstance(torch.load(tmp_path / "kt.pt", weights_only=True)["metrics"]["converged"], bool)
    row = dict(arch="a", params_m=1, gflops=1, images_per_s=None, training="-", train_wall_s=1, unreadable_test_images=0)
    table = evaluate.summarize({"kt@0": dict(row, converged=False, top1=1.0), "kt@1": dict(row, converged=True, top1=2.0),
                                "scratch@0": dict(row, converged=None, top1=1.0)})
    assert table["kt"]["converged"] is False and table["scratch"]["converged"] is None
    assert "| kt (not converged) |" in evaluate.markdown(table) and "| scratch |" in evaluate.markdown(table)


def test_function_matching_mixes_one_view_that_both_models_see(tiny, tmp_path, cpu, monkeypatch):
    """--mix (Beyer et al. 2022): the batch mixed with itself rolled by one; mixup keeps at least half of each
    image (big_vision's p=1.0, n=2), cutmix pastes a box; teacher and student are given the same mixed views."""
    torch.manual_seed(0)
    x = torch.rand(6, 3, 8, 8)
    other = x.roll(1, dims=0)
    assert distill.mixed_views(x, "none") is x
    mixed = distill.mixed_views(x, "mixup")
    lam = ((mixed - other) / (x - other)).flatten()
    assert 0.5 <= lam[0] <= 1 and torch.allclose(lam, lam[0].expand_as(lam), atol=1e-3)  # one coefficient
    for mix in ("cutmix", "both"):
        for _ in range(5):
            mixed = distill.mixed_views(x, mix)
            from_x, from_other = mixed == x, mixed == other
            assert (from_x | from_other).all() or mix == "both"  # each pixel its own or its neighbour's
    seen = {"teacher": [], "student": []}
    teacher_outputs, student_step = distill.teacher_outputs, distill.student_step
    monkeypatch.setattr(distill, "teacher_outputs", lambda t, x, *a: seen["teacher"].append(x) or teacher_outputs(t, x, *a))
    monkeypatch.setattr(distill, "student_step", lambda s, o, sc, ac, x, *a: seen["student"].append(x) or
                        student_step(s, o, sc, ac, x, *a))
    views = {}
    for mix in ("none", "mixup", "cutmix"):
        seen["teacher"].clear(), seen["student"].clear()
        run(distill, "--teacher", tiny / "teacher.pt", "--student", tiny / "student.pt", "--transfer",
            tiny / "transfer.txt", "--epochs", 2, "--batch-size", 8, "--workers", 0, "--mix", mix,
            "--out", tmp_path / f"{mix}.pt")
        assert len(seen["teacher"]) == 4 and all(torch.equal(t, s) for t, s in zip(seen["teacher"], seen["student"]))
        views[mix] = seen["teacher"][:]
    for mix in ("mixup", "cutmix"):  # the same images (the same seed), mixed
        assert not any(torch.equal(a, b) for a, b in zip(views["none"], views[mix]))
        assert torch.load(tmp_path / f"{mix}.pt", weights_only=True)["args"]["mix"] == mix


# ------------------------------------------------------------------------------ distill_agnostic.py
def test_standin_weights_feed_teacher_and_agnostic_distillation(tmp_path):
    """demo.py's weights file loads into the task's model (timm drops the broad head), and
    distill_agnostic.py writes a student checkpoint in distill.py's format."""
    vfm = str(tmp_path / "vfm.pth")
    demo.main(demo.get_args_parser().parse_args(
        ["--arch", "test_vit", "--img-size", "32", "--per-class", "2", "--epochs", "1", "--out", vfm]))
    model, _, _ = models.create_model("test_vit", len(demo.CLASSES), weights=vfm, img_size=32)
    stored = torch.load(vfm, weights_only=True)
    assert torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], stored["blocks.0.attn.qkv.weight"])
    assert model.get_classifier().out_features == len(demo.CLASSES)

    split = str(tmp_path / "split.json")
    split_step.make_split(split, "demo", 10, 0)
    s_path = str(tmp_path / "student.pt")
    student.main(student.get_args_parser().parse_args(
        ["--model", "test_resnet", "--img-size", "32", "--split", split, "--out", s_path]))
    refs, _ = catalog.split_refs("demo", "unlabeled", range(24))
    transfer = tmp_path / "transfer.txt"
    transfer.write_text("\n".join(refs))
    out = str(tmp_path / "agnostic.pt")
    distill_agnostic.main(distill_agnostic.get_args_parser().parse_args(
        ["--vfm", "test_vit", "--vfm-weights", vfm, "--img-size", "32", "--student", s_path,
         "--transfer", str(transfer), "--epochs", "2", "--batch-size", "8", "--workers", "0", "--out", out]))
    s_ckpt, ckpt = torch.load(s_path, weights_only=True), torch.load(out, weights_only=True)
    assert ckpt["kind"] == "student" and ckpt["recipe"] == s_ckpt["recipe"]
    assert ckpt["model"].keys() == s_ckpt["model"].keys()  # the projection is not in it
    assert [c["stage"] for c in ckpt["cost"]] == ["distill_agnostic"] and ckpt["cost"][0]["steps"] == 4  # 23 of 24
    assert not torch.equal(ckpt["model"]["conv1.0.weight"], s_ckpt["model"]["conv1.0.weight"])
    assert not os.path.exists(out + ".state")
    models.load_model(ckpt)  # rebuilds


# ------------------------------------------ the teacher cache: cache_teacher.py + distill_cached.py
def test_cached_replay_reproduces_the_teachers_view(tiny, tmp_path, cpu):
    cache = tmp_path / "cache"
    run(cache_teacher, *cache_args(tiny, cache))
    meta, c, cost = distill_cached.load_cache(cache)
    assert sorted(os.listdir(cache)) == ["meta.json"] + [f"shard_0000{s}.pt" for s in range(3)]
    assert c["box"].shape == (24, 3, 4) and c["prob"].dtype == torch.float16 and c["cls"].shape == (24, 3, 4)
    assert cost["images"] == 24 * 3 and not any(k in meta for k in ("model", "weights"))
    assert c["flip"].any() and not c["flip"].all()  # both flips occur among 72 views
    t_ckpt = checkpoints.load_checkpoint(tiny / "teacher.pt")
    teacher = models.load_model(t_ckpt).eval()
    views = distill_cached.CachedViews(meta["refs"], c, meta["view_size"], meta["interpolation"], "data")
    items = [(i, v) for i in (0, 11, 23) for v in range(3)]
    x = torch.stack([views[it][0] for it in items])  # the replayed views, rebuilt from box + flip alone
    logits = distill.teacher_outputs(teacher, x, t_ckpt["data_config"], training.amp(torch.device("cpu"))[0])
    prob, cls = logits.softmax(-1).topk(4, dim=-1)
    torch.testing.assert_close(prob.half(), torch.stack([views[it][1][0] for it in items]), atol=2e-3, rtol=0)
    assert torch.equal(cls, torch.stack([views[it][1][1] for it in items]).long())
    # the three views of one image differ, and the box is in source-image pixels
    assert not torch.equal(x[0], x[1]) and (c["box"][..., 0] + c["box"][..., 2] <= 32).all()


def test_cache_resumes_at_the_missing_shard_and_refuses_other_settings(tiny, tmp_path, cpu):
    cache = tmp_path / "cache"
    run(cache_teacher, *cache_args(tiny, cache, "--part", "0/2"))  # one of two jobs
    assert sorted(os.listdir(cache)) == ["meta.json", "shard_00000.pt", "shard_00002.pt"]
    with pytest.raises(SystemExit, match="has 2 of 3 shards"):
        distill_cached.load_cache(cache)
    first = (cache / "shard_00000.pt").stat().st_mtime_ns
    run(cache_teacher, *cache_args(tiny, cache))  # the rest, then train
    run(distill_cached, "--cache", cache, "--student", tiny / "student.pt", "--batch-size", 8, "--workers", 0,
        "--epochs", 1, "--out", tmp_path / "kt.pt")
    assert (cache / "shard_00000.pt").stat().st_mtime_ns == first  # done shards are not redone
    ckpt = torch.load(tmp_path / "kt.pt", weights_only=True)
    assert [c["stage"] for c in ckpt["cost"]] == ["cache_teacher", "distill"] and ckpt["cost"][1]["teacher_images"] == 0
    with pytest.raises(SystemExit, match="built with other views"):
        run(cache_teacher, *cache_args(tiny, cache, "--views", 5))
    with pytest.raises(SystemExit, match="no teacher cache"):
        run(distill_cached, "--student", tiny / "student.pt", "--cache", tmp_path / "nothing", "--out", tmp_path / "x.pt")


def test_a_cache_is_of_one_teacher_and_a_broken_shard_is_remade(tiny, tmp_path, cpu):
    """A teacher retrained at the same path cannot continue a cache of the old one; a second job of the
    same part fails at once; a truncated shard is remade, not counted as done, and distill_cached.py says so."""
    cache, teacher_pt = tmp_path / "cache", tmp_path / "teacher.pt"
    shutil.copy(tiny / "teacher.pt", teacher_pt)
    args = [a if a != tiny / "teacher.pt" else teacher_pt for a in cache_args(tiny, cache)]
    run(cache_teacher, *args, "--part", "0/3")
    torch.manual_seed(1)  # "retrained": another teacher at the same path
    random_checkpoint(teacher_pt, "teacher", "test_vit", [str(c) for c in range(10)])
    with pytest.raises(SystemExit, match="built with other teacher_sha1"):
        run(cache_teacher, *args)
    shutil.copy(tiny / "teacher.pt", teacher_pt)
    holder = subprocess.Popen([sys.executable, "-c", "import time; from kt import claims; claims.claim("
                               f"{str(cache / 'part-1-of-3')!r}); print('claimed', flush=True); time.sleep(60)"],
                              cwd=HERE, stdout=subprocess.PIPE, text=True)  # another job building part 1
    try:
        assert holder.stdout.readline().strip() == "claimed"
        with pytest.raises(SystemExit, match="another process .* is writing .*part-1-of-3"):
            run(cache_teacher, *args, "--part", "1/3")
    finally:
        holder.kill()
        holder.wait()
    run(cache_teacher, *args)
    whole = (cache / "shard_00001.pt").read_bytes()
    (cache / "shard_00001.pt").write_bytes(whole[: len(whole) // 2])  # a disk that lost half of it
    with pytest.raises(SystemExit, match="has 2 of 3 shards \\(missing or broken: .*shard_00001.pt\\)") as e:
        distill_cached.load_cache(cache)
    assert "\n" not in str(e.value)
    run(cache_teacher, *args)  # remade
    assert torch.equal(torch.load(io.BytesIO(whole), weights_only=True)["prob"],
                       torch.load(cache / "shard_00001.pt", weights_only=True)["prob"])
    distill_cached.load_cache(cache)


def test_distill_from_cache_needs_no_teacher_and_is_deterministic(tiny, tmp_path, cpu):
    cache = tmp_path / "cache"
    run(cache_teacher, *cache_args(tiny, cache))
    outs = []  # distill_cached.py takes no teacher: replay never reads it
    for workers in (0, 1):
        out = tmp_path / f"kt{workers}.pt"
        run(distill_cached, "--student", tiny / "student.pt", "--cache", cache,
            "--epochs", 2, "--batch-size", 8, "--workers", workers, "--out", out)
        outs.append(torch.load(out, weights_only=True))
    assert outs[0]["lineage"]["cache"] == str(cache) and outs[0]["lineage"]["transfer_images"] == 24
    assert all(torch.equal(outs[0]["model"][k], outs[1]["model"][k]) for k in outs[0]["model"])


def test_segmentation_from_the_cache_and_under_torchrun(seg, tmp_path, cpu):
    run(cache_teacher, "--teacher", seg / "teacher.pt", "--student", seg / "student.pt", "--transfer",
        seg / "small.txt", "--views", 2, "--topk", 3, "--batch-size", 8, "--workers", 0, "--out", tmp_path / "cache")
    shard = torch.load(next((tmp_path / "cache").glob("shard_*.pt")), weights_only=True)
    assert shard["prob"].shape == (48, 2, 3, 4, 4)  # images x views x top-k x the teacher's patch grid
    run(distill_cached, "--cache", tmp_path / "cache", "--student", seg / "student.pt", "--epochs", 1,
        "--batch-size", 16, "--workers", 0, "--out", tmp_path / "cached.pt")
    torchrun("distill.py", "--teacher", seg / "teacher.pt", "--student", seg / "student.pt", "--transfer",
             seg / "small.txt", "--epochs", 1, "--batch-size", 8, "--workers", 0, "--out", tmp_path / "ddp.pt")
    for name in ("cached", "ddp"):
        model = models.load_model(checkpoints.load_checkpoint(tmp_path / f"{name}.pt")).eval()
        assert model(torch.rand(1, 3, 64, 64)).shape == (1, 9, 8, 8) and math.isfinite(
            checkpoints.load_checkpoint(tmp_path / f"{name}.pt")["metrics"]["distill_loss"])



# ====================================================================================================
# 6. finetune.py
# ====================================================================================================
def test_nan_loss_stops_and_keeps_the_last_good_state(pipeline, tmp_path):
    d = pipeline
    args = ["--student", d / "student.pt", *task_args(d), "--epochs", 3, "--workers", 0, "--save-every", 1,
            "--out", tmp_path / "ft.pt"]
    with pytest.raises(SystemExit, match="loss is nan"):
        run(finetune, *args, "--lr", 1e30)
    state = torch.load(tmp_path / "ft.pt.state", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (tmp_path / "ft.pt").exists()


def test_a_killed_segmentation_finetune_resumes_to_the_same_weights(seg, tmp_path, monkeypatch):
    argv = lambda out: [*seg_args(seg), "--student", seg / "student.pt", "--epochs", 2, "--batch-size", 4,  # noqa: E731
                        "--workers", 0, "--smoothing", 0, "--save-every", 2, "--out", out, "--resume"]
    run(finetune, *argv(tmp_path / "a.pt"))  # 8 scenes, 2 epochs of 2 steps: uninterrupted
    update, calls = Progress.update, []

    def dies_at_step_3(self, *a):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # after the state of step 2 was written
        return update(self, *a)
    monkeypatch.setattr(Progress, "update", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        run(finetune, *argv(tmp_path / "b.pt"))
    monkeypatch.undo()
    assert torch.load(tmp_path / "b.pt.state", weights_only=True)["step"] == 2 and not (tmp_path / "b.pt").exists()
    run(finetune, *argv(tmp_path / "b.pt"))
    a, b = (torch.load(tmp_path / f, weights_only=True)["model"] for f in ("a.pt", "b.pt"))
    assert all(torch.equal(a[k], b[k]) for k in a)



def test_finetune_with_the_teacher_keeps_its_soft_targets(pipeline, tmp_path, cpu):
    """finetune.py --teacher: (1 - w) CE + w KD on the same labeled views; w = 0 is the labels alone."""
    torch.manual_seed(0)
    logits, labels = torch.randn(8, 10), torch.randint(0, 10, (8,))
    ce = finetune.finetune_loss(logits, labels, 0.1)
    assert torch.equal(finetune.finetune_loss(logits, labels, 0.1, logits.clone(), 0.5), 0.5 * ce)  # KD 0 at a match
    assert torch.allclose(finetune.finetune_loss(logits, labels, 0.1, torch.randn(8, 10), 0.0), ce)
    teacher_logits, other = torch.randn(8, 10), torch.randn(8, 10)  # its KD term is distill.py's loss at T = 1
    assert torch.equal(finetune.finetune_loss(logits, labels, 0.1, teacher_logits, 1.0),
                       1.0 * distill.kd_loss(logits, teacher_logits, 1.0))
    assert torch.equal(finetune.finetune_loss(logits, labels, 0.1, teacher_logits, 1.0, other),  # --transfer
                       1.0 * distill.kd_loss(other, teacher_logits, 1.0))
    d = pipeline
    run(finetune, *task_args(d), "--student", d / "kt.pt", "--teacher", d / "teacher.pt", "--epochs", 2,
        "--workers", 0, "--out", tmp_path / "kt_ft.pt")
    ckpt = torch.load(tmp_path / "kt_ft.pt", weights_only=True)
    assert ckpt["args"]["teacher"] == str(d / "teacher.pt") and math.isfinite(ckpt["metrics"]["train_loss"])
    with pytest.raises(SystemExit, match="is a 'student' checkpoint, expected one of \\['teacher'\\]"):
        run(finetune, *task_args(d), "--student", d / "kt.pt", "--teacher", d / "kt.pt", "--out", tmp_path / "x.pt")


def _a_finetune_that_hurts(d, tmp_path):
    """A student that is the teacher (a distillation that reached it: it agrees with the teacher on every
    image) and the pipeline's split with every labeled image given the next class, on which a finetune
    unlearns what the teacher taught. -> (the student's path, the split's path, the split)."""
    ckpt = dict(torch.load(d / "teacher.pt", weights_only=True), kind="student", lineage=dict(teacher="teacher.pt"))
    checkpoints.save_checkpoint(ckpt, tmp_path / "perfect.pt")
    split = json.loads((d / "split.json").read_text())
    n, files = len(split["classes"]), split["files"]
    files["labeled"] = [[r, (y + 1) % n] for r, y in files["labeled"]]
    (tmp_path / "wrong.json").write_text(json.dumps(split))
    return tmp_path / "perfect.pt", tmp_path / "wrong.json", split


def test_the_guard_keeps_the_distilled_student_when_the_finetune_makes_it_worse(pipeline, tmp_path, cpu, capsys):
    """Wrong labels at a high lr, the labels alone: the student unlearns the teacher. On the unlabeled images
    distillation held out it agrees with the teacher on fewer, beyond chance: the guard writes the distilled
    weights and says so in one line; --guard 0 writes the last. With a val part, val decides."""
    assert kt_guard.worse_beyond_chance([1] * 10, [0] * 10)[0]  # 10 lost, none gained: p = 1/1024
    assert kt_guard.worse_beyond_chance([1, 1, 1, 0], [0, 0, 0, 1]) == (False, 3, 1, 5 / 16)  # chance
    assert kt_guard.worse_beyond_chance([1, 0], [1, 0]) == (False, 0, 0, 1.0)
    d = pipeline
    start, wrong, split = _a_finetune_that_hurts(d, tmp_path)
    distilled = torch.load(start, weights_only=True)["model"]
    argv = ["--student", start, "--teacher", d / "teacher.pt", "--kd-weight", 0, "--lr", 3e-3, "--epochs", 4,
            "--workers", 0]
    run(finetune, "--split", wrong, *argv, "--out", tmp_path / "guarded.pt")
    ckpt = torch.load(tmp_path / "guarded.pt", weights_only=True)
    assert all(torch.equal(ckpt["model"][k], distilled[k]) for k in distilled)
    line, = [line for line in capsys.readouterr().err.splitlines() if line.startswith("guard:")]
    assert "the finetune made the student worse" in line and line.endswith("kept the distilled student")
    chosen = ckpt["metrics"]["guard"]  # 58 held-out images: 5% of the 1160 unlabeled, those distill.py held out
    assert chosen["kept"] == "first" and chosen["test"] == "agreement" and chosen["images"] == 58
    assert chosen["first"]["step"] == 0 and chosen["first"]["guard_agreement"] == 100
    assert chosen["lost"] > 10 * chosen["gained"] and chosen["p"] < 1e-3
    records = kt_progress.read_metrics(tmp_path / "guarded.pt.metrics.jsonl")  # measured from step 0, every log
    watched = {"guard_kd", "guard_agreement", "guard_soft_agreement"}
    assert records[0]["step"] == 0 and all(watched <= set(r) for r in records)
    run(finetune, "--split", wrong, *argv, "--guard", 0, "--out", tmp_path / "unguarded.pt")
    ckpt = torch.load(tmp_path / "unguarded.pt", weights_only=True)
    assert ckpt["metrics"]["guard"] is None and not all(torch.equal(ckpt["model"][k], distilled[k]) for k in distilled)
    # a val part (100 unlabeled images, labeled as the student predicts them: it starts right on every one)
    model, cfg = models.load_model(torch.load(start, weights_only=True)).eval(), ckpt["data_config"]
    refs = [r for r, _ in split["files"]["unlabeled"][-100:]]
    images = data.Images(refs, None, models.transform(cfg, train=False))
    with torch.no_grad():
        predicted = model(torch.stack([images[i][0] for i in range(len(refs))])).argmax(-1).tolist()
    split["files"]["unlabeled"] = split["files"]["unlabeled"][:-100]
    split["files"]["val"] = [[r, y] for r, y in zip(refs, predicted)]
    (tmp_path / "val.json").write_text(json.dumps(split))
    run(finetune, "--split", tmp_path / "val.json", *argv, "--out", tmp_path / "val.pt")
    chosen = torch.load(tmp_path / "val.pt", weights_only=True)["metrics"]["guard"]
    assert chosen["kept"] == "first" and chosen["test"] == "val" and chosen["images"] == 100
    assert chosen["first"]["val_top1"] == 100 and chosen["last"]["val_top1"] < 50


def test_the_kd_term_on_transfer_images_resumes_to_the_same_weights(pipeline, tmp_path, cpu, monkeypatch):
    """finetune.py --transfer: the teacher's soft targets on a batch of transfer images each step (as
    distillation had them), not the labeled views; killed and resumed, the same batches and weights."""
    d = pipeline
    argv = lambda out: [*task_args(d), "--student", d / "kt.pt", "--teacher", d / "teacher.pt", "--transfer",  # noqa: E731
                        d / "transfer.txt", "--epochs", 3, "--workers", 0, "--save-every", 2, "--out", out, "--resume"]
    seen = []
    real = finetune.finetune_loss
    monkeypatch.setattr(finetune, "finetune_loss", lambda *a: seen.append(a[5]) or real(*a))
    run(finetune, *argv(tmp_path / "a.pt"))
    assert seen and all(kd is not None and kd.shape[0] == 32 for kd in seen)  # the KD term's own batch
    update, calls = Progress.update, []

    def dies_at_step_4(self, *a):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return update(self, *a)
    monkeypatch.setattr(Progress, "update", dies_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        run(finetune, *argv(tmp_path / "b.pt"))
    monkeypatch.setattr(Progress, "update", update)
    run(finetune, *argv(tmp_path / "b.pt"))
    a, b = (torch.load(tmp_path / f, weights_only=True)["model"] for f in ("a.pt", "b.pt"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_killed_guarded_finetune_resumes_to_the_same_weights_and_choice(pipeline, tmp_path, cpu, monkeypatch):
    """The guard's measures (and its first ones, which it compares with the last) ride in OUT.state."""
    d = pipeline
    argv = lambda out: [*task_args(d), "--student", d / "kt.pt", "--teacher", d / "teacher.pt", "--epochs", 4,  # noqa: E731
                        "--workers", 0, "--save-every", 2, "--out", out, "--resume"]
    run(finetune, *argv(tmp_path / "a.pt"))  # 40 labeled images, 4 epochs of 2 steps: uninterrupted
    update, calls = Progress.update, []

    def dies_at_step_5(self, *a):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # after the state of step 4 was written
        return update(self, *a)
    monkeypatch.setattr(Progress, "update", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        run(finetune, *argv(tmp_path / "b.pt"))
    monkeypatch.undo()
    state = torch.load(tmp_path / "b.pt.state", weights_only=True)
    assert state["step"] == 4 and [r["step"] for r in state["extra"]["records"]] == [0, 1, 2, 3, 4]
    run(finetune, *argv(tmp_path / "b.pt"))
    a, b = (torch.load(tmp_path / f, weights_only=True) for f in ("a.pt", "b.pt"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["metrics"]["guard"] == b["metrics"]["guard"] and a["metrics"]["guard"]["first"]["step"] == 0
    a, b = (kt_progress.read_metrics(tmp_path / f"{f}.metrics.jsonl") for f in ("a.pt", "b.pt"))
    assert [{k: v for k, v in r.items() if k not in ("wall_s", "images_per_s", "generation")} for r in a] == \
        [{k: v for k, v in r.items() if k not in ("wall_s", "images_per_s", "generation")} for r in b]


# ====================================================================================================
# 7. evaluate.py and export.py
# ====================================================================================================
# -------------------------------------------------------------------------------------- evaluate.py
class FixedLogits(nn.Module):
    """A 'model' whose per-pixel logits are one-hot of a fixed prediction, at a coarser grid when asked."""

    def __init__(self, predicted, num_classes):
        super().__init__()
        self.logits = torch.nn.functional.one_hot(predicted, num_classes).permute(0, 3, 1, 2).float()

    def forward(self, x):
        return self.logits[: len(x)]


def test_miou_against_a_hand_computed_case():
    true = torch.tensor([[[0, 0, 1], [1, 2, 255]]])  # (1, 2, 3); 255 is not scored
    predicted = torch.tensor([[[0, 1, 1], [1, 0, 2]]])
    loader = [(torch.zeros(1, 3, 2, 3), true)]
    confusion, none, n = evaluate.predict(FixedLogits(predicted, 3), loader, torch.device("cpu"),
                                          training.amp(torch.device("cpu"))[0], 3, masks.IGNORE)
    assert none is None and n == 1
    assert confusion.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]  # true x predicted, 5 pixels
    got = evaluate.scores(confusion, True, ["a", "b", "c"])
    # IoU: a 1 / (2 + 2 - 1), b 2 / (2 + 3 - 2), c 0 / 1; pixel accuracy 3 / 5; recalls 1/2, 1, 0
    assert got["miou"] == pytest.approx(100 / 3) and got["pixel_acc"] == pytest.approx(60)
    assert got["mean_class"] == pytest.approx(50) and got["per_class_iou"] == {"a": 33.33, "b": 66.67, "c": 0.0}
    # a class never in the masks nor predicted is left out of the mean, as mmsegmentation does
    wide = np.zeros((4, 4), np.int64)
    wide[:3, :3] = confusion
    assert evaluate.scores(wide, True, list("abcd"))["miou"] == pytest.approx(100 / 3)
    # classification keeps every class, 255 included (ImageNet has one)
    cls = evaluate.scores(np.diag([3, 1]), False, ["x", "y"])
    assert cls == dict(top1=100.0, mean_class=100.0)


def test_masks_are_scored_at_their_own_resolution():
    from PIL import Image
    from torchvision import tv_tensors
    cfg = dict(input_size=[3, 16, 16], mean=[0.5] * 3, std=[0.5] * 3)
    transform = masks.pair_transform(cfg, train=False)
    big, small = (tv_tensors.Mask(torch.zeros(h, w, dtype=torch.int64)) for h, w in ((30, 40), (20, 20)))
    items = [transform(Image.new("RGB", (40, 30)), big), transform(Image.new("RGB", (20, 20)), small)]
    assert items[0][0].shape == (3, 16, 16) and items[0][1].shape == (30, 40)  # the image resized, the mask not
    x, y = evaluate.collate_readable(items)
    assert x.shape == (2, 3, 16, 16) and [m.shape for m in y] == [(30, 40), (20, 20)]
    logits = torch.zeros(2, 3, 4, 4)
    logits[:, 0] = 1  # predicts class 0 everywhere: every pixel of both masks is right
    confusion, _, n = evaluate.predict(lambda x: logits, [(x, y)], torch.device("cpu"),
                                       training.amp(torch.device("cpu"))[0], 3, masks.IGNORE)
    assert n == 2 and confusion[0, 0] == 30 * 40 + 20 * 20 and confusion.sum() == confusion[0, 0]


def test_evaluate_leaves_unreadable_test_images_out_and_says_so(tmp_path):
    dataset = _folder_dataset(tmp_path, n=3)
    (tmp_path / "test" / "dog" / "2.png").write_bytes(b"")  # one of 6 test images cannot be read
    random_checkpoint(tmp_path / "m.pt", "student", "test_resnet", ["cat", "dog"])
    split = make_split(tmp_path, "--dataset", dataset, "--shots", 1)
    table = run(evaluate, *split, "--workers", 0, "--out", tmp_path / "r.json", f"m={tmp_path / 'm.pt'}")
    assert table["m"]["test_images"] == 5 and table["m"]["unreadable_test_images"] == 1
    assert "1 test images could not be read" in (tmp_path / "r.md").read_text()
    with pytest.raises(SystemExit, match="m named twice"):
        run(evaluate, *split, "--out", tmp_path / "r.json", f"m={tmp_path / 'm.pt'}", f"m={tmp_path / 'm.pt'}")


def test_reparameterised_fastvit_gives_the_same_outputs(cpu):
    torch.manual_seed(0)
    model = models.create_model("fastvit_t8", 10, img_size=64)[0].eval()
    for m in model.modules():  # trained-looking batch-norm statistics, so that folding them is a real test
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    folded, changed = models.deployed(model)
    x = torch.randn(4, 3, 64, 64)
    with torch.inference_mode():
        want, got = model(x), folded(x)
    assert changed and folded is not model
    assert sum(p.numel() for p in folded.parameters()) < sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    resnet = models.create_model("test_resnet", 10, img_size=32)[0].eval()
    assert models.deployed(resnet) == (resnet, False)  # nothing to fold: the model itself


def test_evaluate_times_the_deployed_form_and_draws_the_chart(tmp_path, cpu):
    dataset = _folder_dataset(tmp_path, n=2)
    model, recipe, cfg = models.create_model("fastvit_t8", 2, img_size=64)
    checkpoints.save_checkpoint(dict(kind="student", recipe=recipe, data_config=cfg, classes=["cat", "dog"],
                                     model=model.state_dict(), cost=[]), tmp_path / "fastvit.pt")
    random_checkpoint(tmp_path / "resnet.pt", "student", "test_resnet", ["cat", "dog"])
    table = run(evaluate, *make_split(tmp_path, "--dataset", dataset, "--shots", 1), "--workers", 0, "--speed-batch", 2,
                "--out", tmp_path / "r.json",
                f"fastvit={tmp_path / 'fastvit.pt'}", f"resnet={tmp_path / 'resnet.pt'}")
    fv, rn = table["fastvit"], table["resnet"]
    assert fv["reparameterized"] and fv["images_per_s"] > 0 and fv["images_per_s_training_form"] > 0
    assert fv["params_m"] < sum(p.numel() for p in model.parameters()) / 1e6  # counted as deployed
    assert not rn["reparameterized"] and rn["images_per_s_training_form"] is None
    assert "(training form" in (tmp_path / "r.md").read_text()
    from PIL import Image
    assert Image.open(tmp_path / "r.png").size[0] >= 640  # the chart, drawn without any plotting library
    table = run(evaluate, *make_split(tmp_path, "--dataset", dataset, "--shots", 1), "--workers", 0, "--speed-batch", 0,
                "--out", tmp_path / "r.json",
                f"resnet={tmp_path / 'resnet.pt'}")
    assert table["resnet"]["images_per_s"] is None and "| - |" in (tmp_path / "r.md").read_text()


def test_the_report_draws_every_rows_training_curves_from_its_metrics_files(pipeline, tmp_path):
    """results_curves.png: each row's distillation held-out KD loss and its training on the labels, read
    from the metrics files its checkpoint's stages name; results.md links it."""
    d = pipeline
    run(evaluate, "--split", d / "split.json", "--workers", 0, "--speed-batch", 0, "--out", tmp_path / "r.json",
        f"teacher={d / 'teacher.pt'}", f"kt_distilled={d / 'kt.pt'}", f"kt={d / 'kt_ft.pt'}")
    held_out, labels = evaluate.curves(torch.load(d / "kt_ft.pt", weights_only=True))
    distilled = kt_progress.read_metrics(d / "kt.pt.metrics.jsonl")
    assert held_out == [(r["images"], r["held_out_kd"]) for r in distilled] and held_out[0][0] == 0
    assert labels == [(r["images"], r["loss"]) for r in kt_progress.read_metrics(d / "kt_ft.pt.metrics.jsonl")]
    assert evaluate.curves(torch.load(d / "kt.pt", weights_only=True))[1] is None  # its last stage: distillation
    from PIL import Image
    assert Image.open(tmp_path / "r_curves.png").size[0] >= 960
    assert "[r_curves.png](r_curves.png)" in (tmp_path / "r.md").read_text()
    ckpt = torch.load(d / "kt_ft.pt", weights_only=True)  # its finetune redone since (another generation)
    ckpt["cost"][-1]["generation"] = "another"
    assert evaluate.curves(ckpt)[1] is None and evaluate.curves(ckpt)[0] == held_out  # not another run's curve


# ---------------------------------------------------------------------------------------- export.py
def _export(tmp_path, student, *extra):
    split = [] if "--split" in extra else make_split(tmp_path, "--dataset", "demo", "--shots", 1)
    return run(export, "--student", student, *split, "--images", 4, "--repeats", 1, "--out", tmp_path / "export/s",
               *extra)


def test_export_round_trip_with_its_data_config(tmp_path, cpu, monkeypatch, capsys):
    random_checkpoint(tmp_path / "s.pt", "student", "test_resnet", list(demo.CLASSES))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    report = _export(tmp_path, tmp_path / "s.pt")  # without the optional onnx package: one line, the rest done
    out = capsys.readouterr().out
    assert "ONNX skipped: onnx" in out and "not installed (pip install onnx" in out
    program = torch.export.load(str(tmp_path / "export/s/model.pt2")).module()
    x = torch.rand(3, 3, 32, 32)  # another batch size than the export saw
    torch.testing.assert_close(program(x), models.load_model(checkpoints.load_checkpoint(tmp_path / "s.pt")).eval()(x))
    meta = json.loads((tmp_path / "export/s/export.json").read_text())
    assert meta["classes"] == list(demo.CLASSES) and meta["data_config"]["input_size"] == [3, 32, 32]
    assert meta["check"]["max_relative_diff"]["torch.export"] < 1e-5 and set(meta["latency_ms"]) == {"batch_1", "batch_64"}
    assert report["files"] == ["README.md", "config.json", "model.pt2", "model.safetensors", "export.json"]
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["s"]  # no temp, lock or old generation


def test_the_student_ships_as_a_timm_model_folder(tmp_path, cpu):
    """export.py's folder holds what timm.models.save_for_hf writes, plus a model card; timm.create_model
    rebuilds it from the folder alone, with the checkpoint's outputs, classes and preprocessing."""
    import timm
    random_checkpoint(tmp_path / "s.pt", "student", "test_vit", list(demo.CLASSES))
    report = _export(tmp_path, tmp_path / "s.pt")
    folder = tmp_path / "export/s"
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in folder.iterdir()}
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    ckpt = checkpoints.load_checkpoint(tmp_path / "s.pt")
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), models.load_model(ckpt).eval()(x))
    cfg = timm.data.resolve_data_config({}, model=model)
    assert cfg["input_size"] == (3, 32, 32) and list(cfg["mean"]) == ckpt["data_config"]["mean"]
    assert model.pretrained_cfg["label_names"] == list(demo.CLASSES)
    assert report["check"]["max_relative_diff"]["timm folder"] < 1e-6
    card = (folder / "README.md").read_text()
    assert "library_name: timm" in card and "circle, square" in card and 'create_model("local-dir:' in card
    config = json.loads((folder / "config.json").read_text())  # the init weights' tag is not these weights'
    assert "tag" not in config["pretrained_cfg"] and "license" not in config["pretrained_cfg"]


def test_the_model_card_is_what_the_hub_reads(tmp_path, cpu):
    """The card parses with huggingface_hub's own parser: pipeline_tag, library_name, tags, the license given,
    base_model where the student started from hub weights, and the test scores of --results as its
    model-index; no local path in it; the folder still rebuilds the student with timm."""
    import timm
    from huggingface_hub import ModelCard
    random_checkpoint(tmp_path / "s.pt", "student", "test_resnet", list(demo.CLASSES))
    ckpt = torch.load(tmp_path / "s.pt", weights_only=True)
    ckpt.update(init=dict(weights="hub", base_model="timm/test_resnet.r160_in1k"),
                split=dict(dataset=f"folder:{tmp_path}/my_shapes", shots=10, seed=0))
    torch.save(ckpt, tmp_path / "s.pt")
    (tmp_path / "results.json").write_text(json.dumps({"runs": {"kt@0": dict(
        checkpoint=str(tmp_path / "s.pt"), top1=61.04, mean_class=60.5, agreement=70.2)}}))
    _export(tmp_path, tmp_path / "s.pt", "--results", tmp_path / "results.json", "--license", "apache-2.0")
    card = ModelCard.load(tmp_path / "export/s/README.md")
    assert (card.data.pipeline_tag, card.data.library_name, card.data.license, card.data.base_model) == \
        ("image-classification", "timm", "apache-2.0", "timm/test_resnet.r160_in1k")
    assert {"timm", "knowledge-distillation"} <= set(card.data.tags)
    results = {(r.dataset_name, r.dataset_split, r.metric_name): r.metric_value for r in card.data.eval_results}
    assert results == {("my_shapes", "test", "top-1 accuracy"): 61.04, ("my_shapes", "test", "mean per-class accuracy"): 60.5}
    assert "| top-1 agreement with the teacher | 70.2 |" in card.text and str(tmp_path) not in card.content.split("---")[1]
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(timm.create_model(f"local-dir:{tmp_path / 'export/s'}", pretrained=True).eval()(x),
                                   models.load_model(ckpt).eval()(x))


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxscript", "onnxruntime")),
                    reason="the optional packages onnx, onnxscript and onnxruntime are not installed")
def test_onnx_export_matches_pytorch(tmp_path, cpu):
    random_checkpoint(tmp_path / "s.pt", "student", "test_resnet", list(demo.CLASSES))
    report = _export(tmp_path, tmp_path / "s.pt")
    import onnxruntime
    session = onnxruntime.InferenceSession(str(tmp_path / "export/s/model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.rand(5, 3, 32, 32)
    want = models.load_model(checkpoints.load_checkpoint(tmp_path / "s.pt")).eval()(x).detach()
    torch.testing.assert_close(torch.from_numpy(session.run(None, {"image": x.numpy()})[0]), want, rtol=1e-4, atol=1e-4)
    assert report["check"]["max_relative_diff"]["onnx"] < 1e-4


def test_a_failed_export_check_writes_nothing(tmp_path, cpu, monkeypatch):
    random_checkpoint(tmp_path / "s.pt", "student", "test_resnet", list(demo.CLASSES))
    _export(tmp_path, tmp_path / "s.pt")
    before = {p.name: p.read_bytes() for p in (tmp_path / "export/s").iterdir()}
    real = models.deployed

    def wrong_folding(model):  # a reparameterisation that changes what the model computes
        folded = copy.deepcopy(real(model)[0])
        with torch.no_grad():
            next(folded.parameters()).add_(0.5)
        return folded, True
    monkeypatch.setattr(models, "deployed", wrong_folding)
    with pytest.raises(SystemExit, match="the torch.export export differs from PyTorch .* nothing written"):
        _export(tmp_path, tmp_path / "s.pt")
    assert {p.name: p.read_bytes() for p in (tmp_path / "export/s").iterdir()} == before  # the last export, whole
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["s", "s.lock"]  # (the lock goes at exit)


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_folder_output_is_one_whole_generation_at_every_moment_of_its_commit(tmp_path):
    """claims.commit_folder sets the old generation aside, renames the new one in, deletes the old one. A
    writer killed before, between or after those renames leaves, once the next claim has tidied up, the old
    generation whole or the new one whole."""
    def generation(name, files=("a", "b")):
        (tmp_path / name).mkdir()
        for f in files:
            (tmp_path / name / f).write_text(name)
    dead, out = _dead_pid(), str(tmp_path / "s")
    for killed_after, want in [(0, "s"), (1, "s"), (2, f"s.tmp{dead}")]:  # renames done when killed
        shutil.rmtree(tmp_path)
        tmp_path.mkdir()
        generation("s")
        generation(f"s.tmp{dead}")
        if killed_after >= 1:
            os.rename(out, f"{out}.old{dead}")
        if killed_after >= 2:
            os.rename(f"{out}.tmp{dead}", out)
        claims.remove_dead_temps(out)
        assert [p.name for p in tmp_path.iterdir()] == ["s"]
        assert {p.read_text() for p in (tmp_path / "s").iterdir()} == {want}  # every file of one generation
    generation("new")
    claims.commit_folder(str(tmp_path / "new"), out)
    assert [p.name for p in tmp_path.iterdir()] == ["s"] and (tmp_path / "s/a").read_text() == "new"


def test_a_killed_export_leaves_the_last_whole_export(tmp_path, cpu):
    """export.py killed (SIGKILL) while it works: the folder is the previous export, whole, and agrees with
    its student; the next run tidies up after the dead writer and replaces it whole."""
    import timm
    for i in range(2):
        torch.manual_seed(i)
        random_checkpoint(tmp_path / f"s{i}.pt", "student", "test_resnet", list(demo.CLASSES))
    split = make_split(tmp_path, "--dataset", "demo", "--shots", 1)
    cmd = lambda i: [sys.executable, "export.py", "--student", str(tmp_path / f"s{i}.pt"), *map(str, split),
                     "--images", "2", "--repeats", "1", "--out", str(tmp_path / "export/s")]
    subprocess.run(cmd(0), cwd=HERE, check=True, capture_output=True)
    p = subprocess.Popen(cmd(1), cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list((tmp_path / "export").glob("s.tmp*")) and time.time() < deadline:
        time.sleep(0.02)  # until it writes its new generation
    p.kill()
    p.wait()
    folder, x = tmp_path / "export/s", torch.rand(2, 3, 32, 32)
    claims.remove_dead_temps(str(folder))  # what the next run's claim does first
    assert json.loads((folder / "export.json").read_text())["student"] == str(tmp_path / "s0.pt")
    want = models.load_model(checkpoints.load_checkpoint(tmp_path / "s0.pt")).eval()(x)
    torch.testing.assert_close(torch.export.load(str(folder / "model.pt2")).module()(x), want)
    torch.testing.assert_close(timm.create_model(f"local-dir:{folder}", pretrained=True).eval()(x), want)
    assert sorted(q.name for q in (tmp_path / "export").iterdir()) == ["s", "s.lock"]  # (a lock of the dead)
    run(export, "--student", tmp_path / "s1.pt", *split, "--images", 2, "--repeats", 1, "--out", folder)
    assert json.loads((folder / "export.json").read_text())["student"] == str(tmp_path / "s1.pt")


def test_export_refuses_a_folder_that_is_not_its_own_and_an_input_inside_its_out(tmp_path, cpu):
    random_checkpoint(tmp_path / "s.pt", "student", "test_resnet", list(demo.CLASSES))
    split = make_split(tmp_path, "--dataset", "demo", "--shots", 1)
    (tmp_path / "run").mkdir()
    (tmp_path / "run/results.json").write_text("{}")
    for out, extra, message in [(tmp_path / "run", [], r"is a folder of other files \(it has no export.json\)"),
                                (tmp_path / "s.pt", [], "is a file; give a folder name"),
                                (tmp_path / "x.pt2", [], "export.py writes a folder"),
                                (tmp_path / "e", ["--results", tmp_path / "e/results.json"], "holds")]:
        if extra:
            (tmp_path / "e").mkdir()
            (tmp_path / "e/export.json").write_text("{}")
            (tmp_path / "e/results.json").write_text("{}")
        with pytest.raises(SystemExit, match=message):
            run(export, "--student", tmp_path / "s.pt", *split, *extra, "--out", out)
    assert (tmp_path / "run/results.json").read_text() == "{}" and (tmp_path / "e/results.json").exists()


def test_a_segmenter_exports_and_says_what_it_outputs(seg, tmp_path, cpu):
    report = _export(tmp_path, seg / "student.pt", "--split", seg / "split.json")
    program = torch.export.load(str(tmp_path / "export/s/model.pt2")).module()
    x = torch.rand(3, 3, 64, 64)
    torch.testing.assert_close(program(x), models.load_model(checkpoints.load_checkpoint(seg / "student.pt")).eval()(x))
    assert report["output"].startswith("segmentation logits (B, classes, h, w)")


# ====================================================================================================
# 8. the steps end to end, the demo's stand-in VFM, run.sh
# ====================================================================================================
# ----------------------------------------------------------------------------- the steps end to end
def test_pipeline_end_to_end(pipeline):
    d = pipeline
    split = json.loads((d / "split.json").read_text())
    assert len(split["labeled"]) == 40 and len(split["labeled"]) + len(split["unlabeled"]) == 1200
    assert len((d / "transfer.txt").read_text().split()) == len(split["unlabeled"])
    kt = torch.load(d / "kt_ft.pt", weights_only=True)
    assert [c["stage"] for c in kt["cost"]] == ["teacher", "distill", "finetune"]
    assert not list(d.glob("*.state"))  # resumable states are removed once a step is done
    table = run(evaluate, "--split", d / "split.json", "--workers", 0, "--out", d / "results.json",
                f"teacher={d / 'teacher.pt'}", f"kt={d / 'kt_ft.pt'}", f"kt@1={d / 'kt.pt'}")
    assert list(table) == ["teacher", "kt"] and table["kt"]["seeds"] == 2
    runs = json.loads((d / "results.json").read_text())["runs"]
    for name, path in [("teacher", d / "teacher.pt"), ("kt", d / "kt_ft.pt"), ("kt@1", d / "kt.pt")]:
        ckpt = checkpoints.load_checkpoint(path)  # top-1 as counted here, image by image
        images = data.part_dataset(split, "test", ckpt["data_config"], train=False)
        x, y = (torch.stack(t) if i == 0 else torch.tensor(t) for i, t in enumerate(zip(*[images[i] for i in range(len(images))])))
        with torch.no_grad():
            right = (models.load_model(ckpt).eval()(x).argmax(1) == y).float().mean().item()
        assert runs[name]["top1"] == pytest.approx(100 * right) and runs[name]["params_m"] > 0 and runs[name]["gflops"] > 0
    assert table["kt"]["top1"] == pytest.approx((runs["kt"]["top1"] + runs["kt@1"]["top1"]) / 2)
    assert (d / "results.md").read_text().count("\n| ") == 2


def test_segmentation_end_to_end(seg, tmp_path, capsys):
    d = seg
    t = torch.load(d / "teacher.pt", weights_only=True)
    assert t["recipe"]["decoder"] == "linear" and torch.load(d / "student.pt", weights_only=True)["recipe"]["decoder"] == "lraspp"
    assert models.load_model(t)(torch.zeros(1, 3, 64, 64)).shape == (1, 9, 4, 4)  # ViT patch grid, 16 px
    run(distill, "--teacher", d / "teacher.pt", "--student", d / "student.pt", "--transfer", d / "small.txt",
        "--epochs", 1, "--batch-size", 16, "--workers", 0, "--out", tmp_path / "kt.pt")
    vfm = tmp_path / "vfm.pth"  # the frozen VFM's patch features: what the task-agnostic baseline matches
    torch.save(models.create_model("test_vit", 1, img_size=64)[0].state_dict(), vfm)
    run(distill_agnostic, "--vfm", "test_vit", "--vfm-weights", vfm, "--img-size", 64, "--student", d / "student.pt",
        "--transfer", d / "small.txt", "--epochs", 1, "--batch-size", 16, "--workers", 0, "--out", tmp_path / "ag.pt")
    assert torch.load(tmp_path / "ag.pt", weights_only=True)["recipe"]["decoder"] == "lraspp"
    run(finetune, *seg_args(d), "--student", tmp_path / "kt.pt", "--epochs", 1, "--workers", 0, "--smoothing", 0,
        "--out", tmp_path / "kt_ft.pt")
    table = run(evaluate, "--split", d / "split.json", "--workers", 0, "--speed-batch", 1,
                "--out", tmp_path / "results.json", f"teacher={d / 'teacher.pt'}", f"kt={tmp_path / 'kt_ft.pt'}")
    for row in table.values():
        assert 0 <= row["miou"] <= 100 and 0 <= row["pixel_acc"] <= 100 and len(row["per_class_iou"]) == 9
    md = (tmp_path / "results.md").read_text()
    assert "| mIoU | pixel acc |" in md and "top-1" not in md
    assert (tmp_path / "results.png").exists()
    # a classification checkpoint is refused by a segmentation teacher, in one line
    random_checkpoint(tmp_path / "cls.pt", "student", "test_resnet", demo.SCENE_CLASSES)
    with pytest.raises(SystemExit, match="the teacher is for segmentation of .* the student for classification of .*: they were made for different tasks"):
        run(distill, "--teacher", d / "teacher.pt", "--student", tmp_path / "cls.pt", "--transfer", d / "small.txt",
            "--out", tmp_path / "x.pt")
    with pytest.raises(SystemExit, match="the teacher is for segmentation of .* the student for classification"):
        run(cache_teacher, "--teacher", d / "teacher.pt", "--student", tmp_path / "cls.pt", "--transfer",
            d / "small.txt", "--out", tmp_path / "cache")


def test_every_step_answers_help(capsys):
    import kt_in_one_file
    for module in (split_step, teacher, student, transfer_set, distill, cache_teacher, distill_cached,
                   distill_agnostic, finetune, evaluate, export, kt_in_one_file, bench):
        with pytest.raises(SystemExit) as e:
            module.get_args_parser().parse_args(["--help"])
        assert e.value.code == 0 and "usage" in capsys.readouterr().out
    for module, bad in ((split_step, ["--shots", "-3"]), (finetune, ["--epochs", "0"]), (distill, ["--workers", "-1"]),
                        (transfer_set, ["--k", "0"]), (evaluate, ["--batch-size", "x"])):
        with pytest.raises(SystemExit) as e:  # a count out of range is a usage error, before anything runs
            module.get_args_parser().parse_args(bad)
        assert e.value.code == 2 and f"argument {bad[0]}: invalid" in capsys.readouterr().err


# -------------------------------------------------------------------------- the demo's stand-in VFM
def test_standin_pretraining_classes_are_not_the_task_classes():
    assert not set(demo.BROAD_CLASSES) & set(demo.CLASSES)
    assert len(set(demo.BROAD_CLASSES)) == len(demo.BROAD_CLASSES) >= 20
    images, labels = demo.broad_pool(1)
    assert images.shape == (len(demo.BROAD_CLASSES), demo.SIZE, demo.SIZE, 3)
    assert sorted(labels.tolist()) == list(range(len(demo.BROAD_CLASSES)))
    assert len(demo.Shapes("unlabeled")) == demo.PER_CLASS["unlabeled"] * len(demo.CLASSES)


def test_the_harder_task_has_more_classes_on_clutter_and_its_standin_other_classes(tmp_path):
    """demo-clutter (kt/clutter.py): 20 classes, none a class of the stand-in VFM's pool, which is drawn on the
    same clutter; split.py knows it by name, and each image is drawn from (split, index) alone."""
    from kt import clutter
    assert len(clutter.CLASSES) == 20 and not set(clutter.CLASSES) & set(demo.BROAD_CLASSES)
    images, labels = clutter.broad_pool(1)
    assert images.shape == (len(demo.BROAD_CLASSES), 32, 32, 3) and images.std() > 40  # not a flat background
    split = run(split_step, "--dataset", "demo-clutter", "--shots", 10, "--out", tmp_path / "split.json")
    assert len(split["classes"]) == 20 and len(split["files"]["labeled"]) == 200 and len(split["files"]["test"]) == 800
    ref = split["files"]["test"][5][0]
    assert np.array_equal(np.asarray(data.open_image(ref)), np.asarray(data.open_image(ref)))


# ------------------------------------------------------------------- run.sh, with a stand-in python
STUB = """#!/usr/bin/env bash
# a stand-in python: records each step's command and creates its --out, trains nothing
echo "$*" >> "$CALLS"
[[ -n ${FAIL_ON:-} && $1 == "$FAIL_ON" ]] && exit 1  # a step that fails (or is killed) before its output
[[ -n ${SLEEP_ON:-} && "$*" == *"$SLEEP_ON"* ]] && sleep 60  # a long step
while [[ $# -gt 0 ]]; do
  if [[ $1 == --out ]]; then mkdir -p "$(dirname "$2")"; touch "$2"; fi
  shift
done
"""


def run_sh(tmp_path, *args, fail_on="", sleep_on=""):
    """run.sh in tmp_path with the stand-in python (fail_on: a script that fails; sleep_on: a command that takes
    a minute, those with this in their arguments); returns the finished process."""
    shutil.copy(os.path.join(HERE, "run.sh"), tmp_path / "run.sh")
    shutil.copytree(os.path.join(HERE, "presets"), tmp_path / "presets", dirs_exist_ok=True)
    stub = tmp_path / "fakepy"
    stub.write_text(STUB)
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PY=str(stub), CALLS=str(tmp_path / "calls.txt"), FAIL_ON=fail_on, SLEEP_ON=sleep_on)
    return subprocess.run(["bash", str(tmp_path / "run.sh"), *args], env=env, capture_output=True, text=True)


def run_stubbed(tmp_path, *args):
    """The commands run.sh ran, each split into words (all runs so far in tmp_path)."""
    assert run_sh(tmp_path, *args).returncode == 0
    return [line.split() for line in (tmp_path / "calls.txt").read_text().splitlines()]


def rows_of(calls):
    evaluate = [c for c in calls if c[0] == "evaluate.py"]
    assert len(evaluate) == 1
    return [a.split("=")[0] for a in evaluate[0] if "=" in a and not a.startswith("-")]


def test_every_command_of_run_sh_is_one_its_script_accepts(tmp_path):
    """The stand-in python takes anything; here each command run.sh gave goes through its script's parser."""
    run_stubbed(tmp_path, "--pool", "demo:unlabeled", "--seeds", "0 1")
    run_stubbed(tmp_path, "demo-seg", "--smoke")
    before = len(run_stubbed(tmp_path, "demo-seg", "--smoke"))
    web = run_stubbed(tmp_path, "flowers102", "--pool", "emb:/data/laion400m", "--embed", "open_clip:ViT-B-32/openai")[before:]
    retrieval = next(c for c in web if c[0] == "transfer_set.py" and "retrieval" in c)  # no generic row: no pixels
    assert retrieval[retrieval.index("--download") + 1] == "runs/flowers102/web_images"
    assert not any("generic" in c for c in web if c[0] == "transfer_set.py")
    files = tmp_path / "ADE20K"
    files.mkdir()
    (files / "train_1200img.txt").write_text("ADE_train_00000001.jpg\n")
    (tmp_path / "yfcc").mkdir()
    (tmp_path / "yfcc_retrieved_images_with_1200query.txt").write_text("1.jpg\n")
    before = len((tmp_path / "calls.txt").read_text().splitlines())
    paper = run_stubbed(tmp_path, "ade20k", "--split-files", files, "--budget", "train_1200img", "--pool", "yfcc",
                        "--transfer-names", "yfcc_retrieved_images_with_1200query.txt")[before:]
    named = next(c for c in paper if c[0] == "transfer_set.py" and "labeled,named" in c)  # the paper's own set
    assert named[named.index("--names") + 1] == "yfcc_retrieved_images_with_1200query.txt"
    calls = run_stubbed(tmp_path, "eurosat", "--pool", "stl10:unlabeled", "--init", "clip=fastvit_mci0.apple_mclip")
    before = len(calls)
    hub = run_stubbed(tmp_path, "hf:someone/dtd:rgb", "--pool", "hf:someone/pool:unsupervised")[before:]
    assert ["split.py", "--dataset", "hf:someone/dtd:rgb"] == hub[0][:3] and "runs/dtd/split.json" in hub[0]
    assert {c[0] for c in calls} >= {"split.py", "teacher.py", "student.py", "transfer_set.py", "distill.py",
                                     "distill_agnostic.py", "finetune.py", "evaluate.py", "export.py"}
    assert web[0][0] == "-c" and "EmbeddingPool" in " ".join(web[0])  # the web pool checked before any work
    for c in [c for c in web + paper + calls + hub if c[0] != "-c"]:  # python SCRIPT.py ARGS, or python -m kt.demo ARGS
        module, argv = (c[1], c[2:]) if c[0] == "-m" else (c[0].removesuffix(".py"), c[1:])
        importlib.import_module(module).get_args_parser().parse_args(argv)


def test_demo_table_has_the_papers_rows(tmp_path):
    calls = run_stubbed(tmp_path)
    assert rows_of(calls) == ["teacher", "kt_target_distilled@0", "kt_target@0", "kt_generic_distilled@0",
                              "kt_generic@0", "agnostic@0", "scratch@0", "imagenet@0"]
    finetunes = {c[c.index("--student") + 1]: c for c in calls if c[0] == "finetune.py"}  # kt: labels + teacher
    assert finetunes["runs/demo/s0/student_kt_target.pt"][-5:-3] == ["--teacher", "runs/demo/teacher.pt"]
    assert "--teacher" not in finetunes["runs/demo/s0/student_scratch.pt"] + finetunes["runs/demo/s0/student_agnostic.pt"]
    steps = [c[0] for c in calls]  # every init's student is made before any training: a missing weight shows first
    assert max(i for i, c in enumerate(steps) if c == "student.py") < steps.index("finetune.py")
    scripts = [c[0] for c in calls]
    assert scripts[:2] == ["-m", "-m"] and [c[1] for c in calls[:2]] == ["kt.demo", "kt.demo"]  # the stand-ins first, then the teacher uses one
    teacher = calls[scripts.index("teacher.py")]
    assert teacher[teacher.index("--weights") + 1] == "runs/demo/standin_vfm.pth"
    agnostic = calls[scripts.index("distill_agnostic.py")]
    assert agnostic[agnostic.index("--vfm-weights") + 1] == "runs/demo/standin_vfm.pth"  # frozen, not the teacher
    assert agnostic[agnostic.index("--transfer") + 1] == "runs/demo/transfer_target.txt"


def test_demo_table_repeats_student_rows_per_seed(tmp_path):
    calls = run_stubbed(tmp_path, "--seeds", "0 1 2", "--pool", "demo:unlabeled")  # a pool: + retrieval
    rows = rows_of(calls)
    assert rows.count("teacher") == 1 and [c[0] for c in calls].count("teacher.py") == 1
    for name in ("kt_target", "kt_target_distilled", "kt_generic", "kt_retrieval", "agnostic", "scratch", "imagenet"):
        assert [r for r in rows if r.split("@")[0] == name] == [f"{name}@{s}" for s in (0, 1, 2)]
    # a rerun skips every step whose output exists: only the evaluation runs again
    again = run_stubbed(tmp_path, "--seeds", "0 1 2", "--pool", "demo:unlabeled")
    assert [c[0] for c in again[len(calls):]] == ["evaluate.py"]


def test_run_sh_gives_one_row_per_init(tmp_path):
    (tmp_path / "dino.pth").write_bytes(b"")
    calls = run_stubbed(tmp_path, "eurosat", "--init", "clip=fastvit_mci0.apple_mclip", "--init",
                        f"dino={tmp_path / 'dino.pth'}", "--kt-init", "dino", "--teacher-weights",
                        str(tmp_path / "dino.pth"))
    assert rows_of(calls) == ["teacher", "kt_target_distilled@0", "kt_target@0", "agnostic@0", "scratch@0",
                              "imagenet@0", "clip@0", "dino@0"]
    students = {c[c.index("--out") + 1]: c for c in calls if c[0] == "student.py"}
    clip = students["runs/eurosat/s0/student_clip.pt"]
    assert clip[clip.index("--model") + 1] == "fastvit_mci0.apple_mclip" and clip[clip.index("--weights") + 1] == "hub"
    distill_call = next(c for c in calls if c[0] == "distill.py")
    assert distill_call[distill_call.index("--student") + 1] == "runs/eurosat/s0/student_dino.pt"
    teacher_call = next(c for c in calls if c[0] == "teacher.py")
    assert teacher_call[teacher_call.index("--weights") + 1] == str(tmp_path / "dino.pth")
    for bad, message in [(["--init", "nothing"], "--init takes NAME=WEIGHTS"),  # (--shots is split.py's to check)
                         (["--init", "x=/no/such.pth"], "WEIGHTS is none, hub"), (["--kt-init", "y"], "not one of")]:
        r = run_sh(tmp_path, "eurosat", "--out", "runs/other", *bad)
        assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1


def test_run_sh_demo_seg_has_the_same_rows_per_pixel(tmp_path):
    calls = run_stubbed(tmp_path, "demo-seg")
    assert rows_of(calls) == ["teacher", "kt_target_distilled@0", "kt_target@0", "kt_generic_distilled@0",
                              "kt_generic@0", "agnostic@0", "scratch@0", "imagenet@0"]
    assert not any("--teacher" in c for c in calls if c[0] == "finetune.py")  # a segmenter: its masks alone
    split_call, teacher_call = (next(c for c in calls if c[0] == step) for step in ("split.py", "teacher.py"))
    assert split_call[split_call.index("--shots") + 1] == "40"  # 40 labeled scenes
    assert teacher_call[teacher_call.index("--decoder") + 1] == "lraspp" and "--smoothing" in teacher_call
    assert all(c[c.index("--img-size") + 1] == "64" for c in calls if c[0] in ("teacher.py", "student.py"))


def test_run_sh_demo_clutter_has_the_demos_rows_with_a_resnet18(tmp_path):
    calls = run_stubbed(tmp_path, "demo-clutter")
    assert rows_of(calls) == ["teacher", "kt_target_distilled@0", "kt_target@0", "kt_generic_distilled@0",
                              "kt_generic@0", "agnostic@0", "scratch@0", "imagenet@0"]
    assert [c[1] for c in calls[:2]] == ["kt.clutter", "kt.clutter"]  # its stand-ins
    generic = next(c for c in calls if c[0] == "transfer_set.py" and "generic" in c)
    assert generic[generic.index("--pool") + 1] == "demo-clutter:unlabeled"
    assert all(c[c.index("--model") + 1] == "resnet18" for c in calls if c[0] in ("teacher.py", "student.py")
               and "--model" in c)
    for c in calls:  # each command goes through its script's parser
        module, argv = (c[1], c[2:]) if c[0] == "-m" else (c[0].removesuffix(".py"), c[1:])
        importlib.import_module(module).get_args_parser().parse_args(argv)


def test_run_sh_ade20k_builds_the_papers_transfer_sets(tmp_path):
    files = tmp_path / "ADE20K"
    files.mkdir()
    (files / "train_1200img.txt").write_text("ADE_train_00000001.jpg\n")
    (tmp_path / "pool").mkdir()
    calls = run_stubbed(tmp_path, "ade20k", "--split-files", files, "--budget", "train_1200img", "--pool", "pool")
    retrieval = next(c for c in calls if c[0] == "transfer_set.py" and "labeled,retrieval" in c)
    assert retrieval[retrieval.index("--total") + 1] == "153600"  # the labeled images + an equal share each
    teacher_call = next(c for c in calls if c[0] == "teacher.py")
    assert "--decoder" not in teacher_call and teacher_call[teacher_call.index("--img-size") + 1] == "448"
    assert teacher_call[teacher_call.index("--smoothing") + 1] == "0"


def test_run_sh_refuses_before_any_work_what_it_would_ignore_or_find_late(tmp_path):
    """Flags the demo fixes, --transfer-names without its pool or file, a pool that is not there, a web pool
    without its files: each one line, exit 2, before any step runs (nothing in calls.txt)."""
    for argv, message in [(["--student", "fastvit_t8"], "demo: --student is fixed by the demo"),
                          (["demo-seg", "--img-size", "224"], "demo-seg: --img-size is fixed by the demo"),
                          (["--teacher", "x"], "--teacher is fixed"), (["--teacher-weights", "w.pth"], "fixed"),
                          (["eurosat", "--transfer-names", "n.txt"], "--transfer-names needs --pool"),
                          (["eurosat", "--pool", "pool", "--transfer-names", "n.txt"], "no such file: --transfer-names"),
                          (["eurosat", "--pool", "no/such/dir"], "no such pool: --pool no/such/dir")]:
        (tmp_path / "pool").mkdir(exist_ok=True)
        r = run_sh(tmp_path, *argv, "--out", "runs/x")
        assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, (argv, r.stderr)
    assert not (tmp_path / "calls.txt").exists() and not (tmp_path / "runs").exists()
    shutil.copy(os.path.join(HERE, "run.sh"), tmp_path / "run.sh")  # a web pool, checked by kt.web_pools itself
    env = dict(os.environ, PY=sys.executable, PYTHONPATH=HERE)
    r = subprocess.run(["bash", str(tmp_path / "run.sh"), "eurosat", "--pool", f"emb:{tmp_path / 'pool'}"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no img_emb/*.npy (LAION, clip-retrieval) nor *.npz" in r.stderr
    assert r.stderr.count("\n") == 1 and not (tmp_path / "runs").exists()


def test_run_sh_stops_its_background_jobs_when_it_fails(tmp_path):
    """The demo pretrains its stand-in VFM in the background; when run.sh fails meanwhile, that job (and the step
    it runs) stops too, and writes nothing more into the run."""
    r = run_sh(tmp_path, fail_on="split.py", sleep_on="standin_vfm")
    assert r.returncode == 1
    time.sleep(0.5)
    left = subprocess.run(["pgrep", "-f", str(tmp_path / "fakepy")], capture_output=True, text=True).stdout
    assert not left.strip(), "a background job of run.sh outlived it"


def test_run_sh_ends_with_the_exported_kt_student(tmp_path):
    calls = run_stubbed(tmp_path, "--seeds", "3 4")
    assert calls[-1][0] == "export.py" and calls[-1][calls[-1].index("--student") + 1] == \
        "runs/demo/s3/student_kt_target_ft.pt"


def test_run_sh_keeps_one_configuration_per_directory(tmp_path):
    n = len(run_stubbed(tmp_path))
    r = run_sh(tmp_path, "--shots", "5")  # would otherwise skip every step and report the 10-shot table
    assert r.returncode == 2 and "runs/demo holds a run of: dataset=demo shots=10 seed=0" in r.stderr
    assert len(run_stubbed(tmp_path, "--seeds", "0 1")) > n  # more seeds: the same configuration
    calls = run_stubbed(tmp_path, "--shots", "5", "--out", "runs/demo5")
    assert ["teacher.py", "runs/demo5/teacher.pt"] in [[c[0], c[-2]] for c in calls]  # ... --out PATH --resume
    assert (tmp_path / "runs/demo5/run.cfg").read_text().startswith("dataset=demo shots=5 ")
    assert run_sh(tmp_path, "--seed", "x").returncode == 2


def test_run_sh_force_clears_every_state(tmp_path):
    run_stubbed(tmp_path)
    state = tmp_path / "runs/demo/s0/student_kt_target.pt.state"
    state.write_bytes(b"a state of the 10-shot run")
    assert run_sh(tmp_path, "--shots", "5", "--force").returncode == 0
    assert not state.exists()
    r = run_sh(tmp_path, "--shots")
    assert r.returncode == 2 and "--shots needs a value" in r.stderr


def test_an_interrupted_force_never_leaves_a_stale_table(tmp_path):
    """--force killed after the new split.json: the next run without --force redoes every step made from the
    old labels (they are older than split.json); a --force whose split.py fails loses nothing."""
    run_stubbed(tmp_path)
    assert run_sh(tmp_path, "--shots", "5", "--force", fail_on="teacher.py").returncode == 1
    n = len((tmp_path / "calls.txt").read_text().splitlines())
    again = [c[0] for c in run_stubbed(tmp_path, "--shots", "5")[n:]]
    assert {"teacher.py", "distill.py", "finetune.py", "evaluate.py"} <= set(again)
    made = tmp_path / "runs/demo/split.json"
    outputs = [f for f in (tmp_path / "runs/demo").rglob("*") if f.suffix in (".pt", ".txt") or f.parent.name == "export"]
    assert len(outputs) >= 14 and all(f.stat().st_mtime_ns >= made.stat().st_mtime_ns for f in outputs)
    cfg, split_json = (tmp_path / "runs/demo/run.cfg").read_text(), (tmp_path / "runs/demo/split.json")
    split_json.write_text("the labels of the 5-shot run")
    assert run_sh(tmp_path, "--shots", "7", "--force", fail_on="split.py").returncode == 1
    assert (tmp_path / "runs/demo/run.cfg").read_text() == cfg and split_json.read_text() == "the labels of the 5-shot run"
    assert run_sh(tmp_path, "--shots", "5").returncode == 0  # the old configuration still runs in its directory



# ====================================================================================================
# 9. files and failures: resume, one writer, bad input, bad images (one line, nothing lost)
# ====================================================================================================
# -------------------------------------------------------------------------------- resume and states
def _distill_cmd(d, out):  # function matching too: a resumed run mixes its views the same
    return [sys.executable, "distill.py", "--teacher", d / "teacher.pt", "--student", d / "student.pt",
            "--transfer", d / "transfer.txt", "--epochs", 2, "--batch-size", 32, "--workers", 0, "--mix", "both",
            "--save-every", 3, "--out", out, "--resume"]


def test_sigkill_then_resume_gives_bitwise_the_same_weights(pipeline, tmp_path):
    d, env = pipeline, dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same arithmetic as the OMP_NUM_THREADS=1 subprocesses below
    try:
        run(distill, *_distill_cmd(d, tmp_path / "a.pt")[2:])  # the uninterrupted reference, in-process
    finally:
        torch.set_num_threads(threads)
    proc = subprocess.Popen(list(map(str, _distill_cmd(d, tmp_path / "b.pt"))), cwd=HERE, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "b.pt.state"
    deadline = time.time() + 120
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(np.random.default_rng().uniform(0, 1.0))  # die at a random later moment
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b.pt").exists(), "the run finished before it could be killed"
    step = torch.load(state, weights_only=True)["step"]
    subprocess.run(list(map(str, _distill_cmd(d, tmp_path / "b.pt"))), cwd=HERE, env=env, check=True,
                   capture_output=True)
    a, b = (torch.load(tmp_path / f, weights_only=True)["model"] for f in ("a.pt", "b.pt"))
    assert step > 0 and all(torch.equal(a[k], b[k]) for k in a)
    # the metrics file holds each step once, with the uninterrupted run's values: lines past the state dropped
    a, b = ([{k: r.get(k) for k in ("step", "images", "loss", "lr", "held_out_kd")} for r in
             kt_progress.read_metrics(tmp_path / f"{f}.metrics.jsonl")] for f in ("a.pt", "b.pt"))
    assert len(a) > 3 and a == b


def _distill_args(d, out, *extra):
    return ["--teacher", d / "teacher.pt", "--student", d / "student.pt", "--transfer", d / "transfer.txt",
            "--epochs", 1, "--batch-size", 64, "--workers", 0, "--save-every", 5, "--out", out, "--resume", *extra]


def _killed_before_the_output(monkeypatch, module, *argv):
    """Run a step in-process and 'kill' it as it writes its output: its last state stays on disk."""
    def killed(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(Progress, "save_output", killed)
    with pytest.raises(KeyboardInterrupt):
        run(module, *argv)
    monkeypatch.undo()


def test_a_state_is_resumed_only_by_the_run_that_saved_it(pipeline, tmp_path, monkeypatch, capsys):
    d, out = pipeline, tmp_path / "kt.pt"
    _killed_before_the_output(monkeypatch, distill, *_distill_args(d, out))
    other = tmp_path / "other.txt"
    other.write_text("\n".join((d / "transfer.txt").read_text().split()[:100]))
    for argv, differ in [(_distill_args(d, out, "--transfer", other), "the content of transfer"),
                         (_distill_args(d, out, "--epochs", 2), "--epochs 1 vs 2"),
                         (_distill_args(d, out, "--student", d / "kt.pt"), "--student")]:  # another model
        with pytest.raises(SystemExit, match=f"is the state of another run .*{differ}") as e:
            run(distill, *argv)
        assert "\n" not in str(e.value) and not out.exists()
    capsys.readouterr()
    run(distill, *_distill_args(d, out))  # the same run: resumed, finished, the state and claim gone
    assert "resuming" in capsys.readouterr().err and out.exists()
    assert [p.name for p in tmp_path.glob("kt.pt.*")] == ["kt.pt.metrics.jsonl"]  # no state, no lock: its curves


def test_the_output_is_written_before_the_state_is_removed(pipeline, tmp_path, monkeypatch):
    d, out = pipeline, tmp_path / "kt.pt"
    real = kt_progress.save_checkpoint

    def killed_writing_the_output(ckpt, path):  # a SIGKILL in the middle of writing the output
        if str(path) == str(out):
            raise KeyboardInterrupt
        real(ckpt, path)
    monkeypatch.setattr(kt_progress, "save_checkpoint", killed_writing_the_output)
    with pytest.raises(KeyboardInterrupt):
        run(distill, *_distill_args(d, out))
    monkeypatch.undo()
    step = torch.load(str(out) + ".state", weights_only=True)["step"]  # the state of the finished training
    assert not out.exists() and step == (1160 - 58) // 64  # 1160 transfer images, 58 held out (5%)
    run(distill, *_distill_args(d, out))  # nothing retrained: resumed at the last step, the output written
    assert torch.load(out, weights_only=True)["cost"][-1]["steps"] == step


def test_sighup_saves_like_sigterm(pipeline, tmp_path):
    cmd = [sys.executable, "distill.py", *map(str, _distill_args(pipeline, tmp_path / "kt.pt", "--epochs", 50,
                                                                 "--save-every", 10000))]
    proc = subprocess.Popen(cmd, cwd=HERE, env=dict(os.environ, OMP_NUM_THREADS="1"), stderr=subprocess.PIPE, text=True)
    while "transfer images" not in proc.stderr.readline():  # training has started
        assert proc.poll() is None
    time.sleep(1)
    proc.send_signal(signal.SIGHUP)  # a closed ssh session
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 1 and "interrupted at step" in err
    assert torch.load(tmp_path / "kt.pt.state", weights_only=True)["step"] > 0


# -------------------------------------------------------------------------- one writer, safe writes
def test_a_second_writer_of_the_same_output_fails_at_once(pipeline, tmp_path):
    d, out = pipeline, tmp_path / "kt.pt"
    holder = subprocess.Popen([sys.executable, "-c", f"import time; from kt import claims; claims.claim({str(out)!r}); "
                               "print('claimed', flush=True); time.sleep(60)"], cwd=HERE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "claimed"
        t = time.time()
        with pytest.raises(SystemExit, match=f"another process \\(pid {holder.pid}\\) is writing .*kt.pt"):
            run(distill, *_distill_args(d, out))
        assert time.time() - t < 5 and not out.exists()
    finally:
        holder.kill()
        holder.wait()
    run(distill, *_distill_args(d, out))  # a dead holder's lock file does not block: the kernel dropped its lock
    assert out.exists() and not (tmp_path / "kt.pt.lock").exists()


def test_an_output_that_cannot_be_written_is_refused_before_any_work(pipeline, tmp_path):
    (tmp_path / "kt.pt").mkdir()
    t = time.time()
    with pytest.raises(SystemExit, match="--out .*kt.pt is a folder"):
        run(distill, *_distill_args(pipeline, tmp_path / "kt.pt"))
    assert time.time() - t < 5 and not list(tmp_path.glob("*.state"))


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "kt.pt"
    stale, live = tmp_path / f"kt.pt.state.tmp{dead.pid}", tmp_path / f"kt.pt.tmp{os.getppid()}"
    stale.write_bytes(b"half a state")
    live.write_bytes(b"another writer's file")
    claims.claim(str(out))
    claims.release(str(out))
    assert not stale.exists() and live.exists()


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    checkpoints.save_checkpoint({"kind": "student", "v": torch.ones(3)}, path)

    def full_disk(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit, match=r"cannot write .*ckpt.pt \(No space left on device\)") as e:
        checkpoints.save_checkpoint({"kind": "student", "v": torch.zeros(3)}, path)  # one line, not a traceback
    assert "\n" not in str(e.value)
    monkeypatch.undo()
    assert torch.equal(checkpoints.load_checkpoint(path)["v"], torch.ones(3))
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_torchs_own_write_errors_and_a_vanished_folder_are_one_line(tmp_path, monkeypatch):
    """A file-size limit or a full disk inside torch's writer raises RuntimeError, not OSError; a folder made
    read-only (or removed) before the lock is released gives no traceback at exit."""
    path = tmp_path / "ckpt.pt"
    checkpoints.save_checkpoint({"kind": "student", "v": torch.ones(3)}, path)

    def writer_failed(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file")
    monkeypatch.setattr(torch, "save", writer_failed)
    with pytest.raises(SystemExit, match=r"cannot write .*ckpt.pt \(RuntimeError: .*PytorchStreamWriter") as e:
        checkpoints.save_checkpoint({"kind": "student", "v": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert "\n" not in str(e.value) and torch.equal(checkpoints.load_checkpoint(path)["v"], torch.ones(3))
    os.makedirs(tmp_path / "gone")
    claims.claim(str(tmp_path / "gone/out.pt"))
    shutil.rmtree(tmp_path / "gone")
    claims.release(str(tmp_path / "gone/out.pt"))  # no error: the lock goes with its file descriptor


# ---------------------------------------------------------------------------------------- bad input
def test_bad_inputs_fail_with_one_line_and_keep_files(pipeline, tmp_path):
    d = pipeline
    keep = tmp_path / "kt.pt"
    keep.write_bytes(b"precious")
    cases = [
        (split_step, ["--dataset", "nosuchdata", "--out", tmp_path / "new_split.json"], "unknown dataset"),
        (teacher, [*task_args(tmp_path), "--model", "no_such_net", "--weights", "none", "--out", keep],
         "unknown model"),
        (distill, ["--teacher", tmp_path / "missing.pt", "--student", d / "student.pt", "--transfer",
                   d / "transfer.txt", "--out", keep], "run teacher.py first"),
        (distill, ["--teacher", d / "student.pt", "--student", d / "student.pt", "--transfer",
                   d / "transfer.txt", "--out", keep], "expected one of \\['teacher'\\]"),
    ]
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases.append((distill, ["--teacher", d / "teacher.pt", "--student", d / "student.pt", "--transfer", empty,
                            "--out", keep], "is empty"))
    other = tmp_path / "other.pt"  # a student for a 3-class task given to the 10-class demo teacher
    random_checkpoint(other, "student", "test_resnet", ["a", "b", "c"])
    cases.append((distill, ["--teacher", d / "teacher.pt", "--student", other, "--transfer",
                            d / "transfer.txt", "--out", keep], "the teacher is for classification of 10 classes, the student for classification of 3"))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((d / "teacher.pt").read_bytes()[:1000])
    cases.append((evaluate, ["--split", d / "split.json", f"t={truncated}", "--out", keep], "not a readable"))
    (tmp_path / "bad_split.json").write_text("{not json")
    cases.append((student, ["--split", tmp_path / "bad_split.json", "--model", "test_resnet", "--out", keep],
                  "bad_split.json is not a split file \\(JSONDecodeError"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache/meta.json").write_text("{}")
    cases.append((distill_cached, ["--cache", tmp_path / "cache", "--student", d / "student.pt", "--out", keep],
                  "not a teacher cache's meta.json \\(KeyError"))
    for module, argv, message in cases:
        with pytest.raises(SystemExit, match=message) as e:
            run(module, *argv)
        assert "\n" not in str(e.value)
        assert keep.read_bytes() == b"precious"


def test_bad_flags_and_files_are_one_line(pipeline, tmp_path, capsys):
    d = pipeline
    for module, flag, value in [(finetune, "--lr", "nan"), (finetune, "--lr", "-1"), (teacher, "--lr", "inf"),
                                (finetune, "--warmup", "nan"), (distill, "--weight-decay", "nan"),
                                (finetune, "--smoothing", "2"), (teacher, "--layer-decay", "nan"),
                                (distill, "--temperature", "0"), (distill, "--min-scale", "0")]:
        with pytest.raises(SystemExit) as e:
            module.get_args_parser().parse_args([flag, value])
        assert e.value.code == 2 and f"argument {flag}: '{value}' is not" in capsys.readouterr().err
    keep = tmp_path / "kt.pt"
    keep.write_bytes(b"precious")
    for name, obj in [("list", [1, 2]), ("tensor", torch.ones(2)), ("teacher_only", {"kind": "teacher"})]:
        torch.save(obj, tmp_path / f"{name}.pt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9.jpg\n".encode("latin-1"))
    (tmp_path / "binary.txt").write_bytes(b"demo:train:1\x00\x01\n")
    (tmp_path / "far.txt").write_text("demo:train:1\ndemo:train:99999\n")
    (tmp_path / "garbage.bin").write_bytes(os.urandom(2048))
    args = ["--student", d / "student.pt", "--transfer", d / "transfer.txt", "--out", keep]
    cases = [(distill, ["--teacher", tmp_path / "list.pt", *args], "'list' checkpoint"),
             (distill, ["--teacher", tmp_path / "tensor.pt", *args], "'Tensor' checkpoint"),
             (distill, ["--teacher", tmp_path / "teacher_only.pt", *args], "not a whole 'teacher' checkpoint"),
             (distill, ["--teacher", d / "teacher.pt", *args[:2], "--transfer", tmp_path / "latin1.txt",
                        "--out", keep], "not UTF-8"),
             (distill, ["--teacher", d / "teacher.pt", *args[:2], "--transfer", tmp_path / "binary.txt",
                        "--out", keep], "binary data")]
    for module, argv, message in cases:
        with pytest.raises(SystemExit, match=message) as e:
            run(module, *argv)
        assert "\n" not in str(e.value) and keep.read_bytes() == b"precious"
    with pytest.raises(SystemExit, match="garbage.bin does not fit tiny-clip") as e:
        models.create_model(f"open_clip:{tiny_clip(tmp_path)}", 2, weights=str(tmp_path / "garbage.bin"))
    assert "\n" not in str(e.value)
    capsys.readouterr()  # a reference past the end of its dataset is one more unreadable image: skipped, said
    run(distill, "--teacher", d / "teacher.pt", *args[:2], "--transfer", tmp_path / "far.txt", "--epochs", 1,
        "--workers", 0, "--out", tmp_path / "far.pt")
    assert "skipped unreadable image demo:train:99999 (IndexError" in capsys.readouterr().err


def test_what_a_step_would_ignore_or_accept_silently_is_said(pipeline, tmp_path, capsys):
    """--kd-weight without --teacher; split files whose labeled and test images overlap (refused by split.py
    itself, not by the next step); a teacher whose classes are named otherwise; a checkpoint of another label
    budget than the split's (evaluated, with a warning)."""
    d = pipeline
    with pytest.raises(SystemExit, match="--kd-weight weighs the teacher's soft targets: it needs --teacher"):
        run(finetune, *task_args(d), "--student", d / "kt.pt", "--kd-weight", 0.3, "--out", tmp_path / "x.pt")
    root = tmp_path / "data/eurosat"  # the paper's EuroSAT files, a test image also labeled
    for c in ("Forest", "River"):
        os.makedirs(root / c)
        for i in range(3):
            demo.draw("circle", np.random.default_rng(i), size=16).save(root / c / f"{c}_{i}.jpg")
    files = tmp_path / "files"
    files.mkdir()
    for name, lines in [("train_full", ["Forest_0", "Forest_1", "River_0", "River_1"]), ("budget", ["Forest_0", "River_0"]),
                        ("val", ["Forest_2"]), ("test", ["River_2", "Forest_0"])]:
        (files / f"{name}.txt").write_text("".join(f"{n}.jpg,{n.split('_')[0]}\n" for n in lines))
    with pytest.raises(SystemExit, match="images are both labeled and test images"):
        run(split_step, "--dataset", "eurosat", "--split-files", files, "--budget", "budget", "--data-root",
            tmp_path / "data", "--out", tmp_path / "split.json")
    assert not (tmp_path / "split.json").exists()
    ckpt = torch.load(d / "teacher.pt", weights_only=True)
    ckpt["classes"] = ckpt["classes"][:3] + ["zebra"] + ckpt["classes"][4:]
    torch.save(ckpt, tmp_path / "renamed.pt")
    with pytest.raises(SystemExit, match=r"name their 10 classes differently \(class 3: 'zebra' vs 'cross'\)"):
        run(distill, "--teacher", tmp_path / "renamed.pt", "--student", d / "student.pt", "--transfer",
            d / "transfer.txt", "--out", tmp_path / "y.pt")
    other = make_split(tmp_path, "--dataset", "demo", "--shots", 2, "--seed", 1, name="other.json")
    capsys.readouterr()
    run(evaluate, *other, "--workers", 0, "--speed-batch", 0, "--out", tmp_path / "r.json", f"kt={d / 'kt_ft.pt'}")
    assert "warning: kt was trained on other labels ({'dataset': 'demo', 'shots': 4, 'seed': 0})" in capsys.readouterr().err


def test_checkpoints_with_bad_contents_are_one_line(pipeline, tmp_path):
    """Valid dicts with wrong insides: a weight missing, a recipe that is no dict, a recipe that would make
    timm open another file, NaN weights; and an --out that is one of the step's inputs. One line each, the
    inputs untouched."""
    d = pipeline
    ckpt = torch.load(d / "kt_ft.pt", weights_only=True)
    variants = dict(
        missing_weight=(dict(ckpt, model={k: v for k, v in list(ckpt["model"].items())[1:]}), "weights do not fit"),
        recipe_list=(dict(ckpt, recipe=["test_resnet"]), "a recipe that rebuilds no model"),
        opens_a_file=(dict(ckpt, recipe=dict(ckpt["recipe"], kwargs=dict(checkpoint_path="/etc/passwd"))),
                      "passes checkpoint_path to the model"),
        nan=(dict(ckpt, model={k: v * float("nan") if v.is_floating_point() else v for k, v in ckpt["model"].items()}),
             "holds NaN or infinite weights"))
    for name, (bad, message) in variants.items():
        checkpoints.save_checkpoint(bad, tmp_path / f"{name}.pt")
        for module, argv in [(evaluate, [f"x={tmp_path / name}.pt", "--out", tmp_path / "r.json"]),
                             (export, ["--student", tmp_path / f"{name}.pt", "--out", tmp_path / "x"])]:
            with pytest.raises(SystemExit, match=message) as e:
                run(module, "--split", d / "split.json", *argv)
            assert "\n" not in str(e.value) and not (tmp_path / "r.json").exists()
    before = (d / "teacher.pt").read_bytes()
    with pytest.raises(SystemExit, match="teacher.pt, an input of this step"):
        run(evaluate, "--split", d / "split.json", f"teacher={d / 'teacher.pt'}", "--out", d / "teacher.pt")
    with pytest.raises(SystemExit, match="teacher.md, an input of this step"):  # its .md beside the .json
        shutil.copy(d / "teacher.pt", tmp_path / "teacher.md")
        run(evaluate, "--split", d / "split.json", f"t={tmp_path / 'teacher.md'}", "--out", tmp_path / "teacher.json")
    assert (d / "teacher.pt").read_bytes() == before


def test_a_killed_step_with_workers_never_blocks_its_resume(pipeline, tmp_path):
    """SIGKILL leaves DataLoader workers behind for a moment; the lock is the process's, not theirs."""
    d, env = pipeline, dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "distill.py", "--teacher", d / "teacher.pt", "--student", d / "student.pt", "--transfer",
           d / "transfer.txt", "--epochs", 3, "--batch-size", 8, "--workers", 1, "--save-every", 5,
           "--out", tmp_path / "kt.pt", "--resume"]
    proc = subprocess.Popen(list(map(str, cmd)), cwd=HERE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "kt.pt.state").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    again = subprocess.run(list(map(str, cmd[:-1] + ["--epochs", 3, "--resume"])), cwd=HERE, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "resuming" in again.stderr, again.stderr[-500:]


def test_a_pickle_in_any_file_never_runs(pipeline, tmp_path):
    marker = tmp_path / "the_pickle_ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    evil = tmp_path / "evil.pt"
    torch.save({"kind": "student", "model": Evil()}, evil)
    tries = [lambda: checkpoints.load_checkpoint(evil, kinds=("student",)),  # every --teacher/--student/state
             lambda: models.create_model("test_resnet", 2, weights=str(evil)),  # timm --weights
             lambda: models.create_model(f"open_clip:{tiny_clip(tmp_path)}", 2, weights=str(evil))]  # open_clip
    for load in tries:
        with pytest.raises(SystemExit):
            load()
    assert not marker.exists()
    floor = next(line for line in open(os.path.join(HERE, "requirements.txt")) if line.startswith("torch>="))
    assert tuple(map(int, floor.split(">=")[1].split(",")[0].split(".")[:2])) >= (2, 6)  # torch.load: weights_only


def test_downloads_offline_are_one_line_not_a_traceback(tmp_path, monkeypatch):
    import timm.models._builder
    import timm.models._hub

    def offline(*args, **kwargs):  # what a machine without internet gets, without touching the network
        raise OSError("Network is unreachable")
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", offline)
    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_url", offline)
    with pytest.raises(SystemExit, match="pretrained weights of resnet18 .*unreachable.*--weights PATH"):
        models.create_model("resnet18", 10, pretrained=True)
    cfg = tiny_clip(tmp_path)
    with pytest.raises(SystemExit, match="could not get the 'nosuchtag' weights of tiny-clip.*--weights PATH"):
        models.create_model(f"open_clip:{cfg}/nosuchtag", 10, pretrained=True)
    with pytest.raises(SystemExit, match="weights file .*missing.bin not found"):
        models.create_model(f"open_clip:{cfg}", 10, weights=str(tmp_path / "missing.bin"))
    import torchvision.datasets.cifar
    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    with pytest.raises(SystemExit, match="could not load cifar10/train .*unreachable.*folder:PATH"):
        catalog.load_dataset("cifar10", "train", str(tmp_path / "data"))


# --------------------------------------------------------------------------------------- bad images
def test_unreadable_images_are_skipped_not_fatal(tmp_path, capsys):
    root = tmp_path / "imgs"
    dataset = _folder_dataset(root, n=2)
    good = catalog.split_refs(dataset, "train")[0]
    (root / "zero.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("not an image")
    (root / "cut.png").write_bytes(open(good[0], "rb").read()[:40])
    refs = [str(root / "zero.jpg"), good[0], str(root / "text.jpg"), str(root / "cut.png"), good[1]]
    images = data.Images(refs, None, models.transform(models.create_model("test_resnet", 2, img_size=16)[2], False))
    shapes = [images[i][0].shape for i in range(len(images))]
    assert shapes == [(3, 16, 16)] * 5
    assert capsys.readouterr().err.count("skipped unreadable image") == 3 + 1  # zero.jpg is met twice


def test_every_failure_to_open_an_image_is_skipped(tmp_path, monkeypatch, capsys):
    import PIL.Image
    good = demo_pool(tmp_path, 2)
    (tmp_path / "not.tar").write_bytes(b"not a tar at all" * 100)
    refs = [good[0], f"{tmp_path / 'not.tar'}::x.jpg", good[1]]  # a broken shard in a transfer list
    images = data.Images(refs, None, lambda im: torch.zeros(1))
    assert [images[i][0].shape for i in range(3)] == [(1,)] * 3
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 100)  # every 32x32 image is now a decompression bomb
    with pytest.raises(RuntimeError, match="no readable image"):
        images[0]
    err = capsys.readouterr().err
    assert "ReadError" in err and "DecompressionBombError" in err


def test_16_bit_images_are_scaled_and_32_bit_ones_refused(tmp_path):
    from PIL import Image
    gray = np.full((8, 8), 32768, dtype=np.uint16)  # 50% grey in 16 bits
    Image.fromarray(gray).save(tmp_path / "g16.png")
    assert np.asarray(data.open_image(str(tmp_path / "g16.png"))).mean() == pytest.approx(127.5, abs=0.6)
    Image.fromarray(np.full((8, 8), 7, dtype=np.int32)).save(tmp_path / "i32.tif")
    with pytest.raises(ValueError, match="32-bit"):
        data.open_image(str(tmp_path / "i32.tif"))



# ====================================================================================================
# 10. speed and scale: torchrun, no host reads in the step loop, bench.py, the CUDA-only checks
# ====================================================================================================
# ----------------------------------------------------------------------------------------- torchrun
def test_distill_runs_under_torchrun_with_two_gloo_processes(tiny, tmp_path):
    out = tmp_path / "ddp.pt"
    torchrun("distill.py", "--teacher", tiny / "teacher.pt", "--student", tiny / "student.pt",
             "--transfer", tiny / "transfer.txt", "--epochs", 2, "--batch-size", 4, "--workers", 0,
             "--save-every", 2, "--out", out)
    ckpt = checkpoints.load_checkpoint(out, kinds=("student",))
    cost = ckpt["cost"][-1]
    assert cost["steps"] == 2 * 3 and cost["batch"] == 8 and cost["images"] == 2 * 24  # 24 images / 2 ranks / 4
    model = models.load_model(ckpt).eval()
    assert torch.isfinite(model(torch.rand(2, 3, 32, 32))).all()
    assert not list(tmp_path.glob("*.state"))


def test_teacher_and_finetune_run_under_torchrun(pipeline, tmp_path):
    shutil.copy(pipeline / "split.json", tmp_path / "split.json")  # the same 40 labeled demo images
    torchrun("teacher.py", *task_args(tmp_path), "--model", "test_vit", *TINY, "--weights", "none",
             "--epochs", 1, "--batch-size", 8, "--workers", 0, "--out", tmp_path / "teacher.pt")
    torchrun("finetune.py", *task_args(tmp_path), "--student", pipeline / "student.pt", "--epochs", 1,
             "--batch-size", 8, "--workers", 0, "--out", tmp_path / "ft.pt")
    for name in ("teacher", "ft"):  # 40 images / 2 ranks / 8 per step = 3 steps of 16 images
        ckpt = checkpoints.load_checkpoint(tmp_path / f"{name}.pt")
        assert {k: ckpt["cost"][-1][k] for k in ("steps", "batch")} == dict(steps=3, batch=16)
        assert math.isfinite(ckpt["metrics"]["train_loss"])
    assert not list(tmp_path.glob("*.state"))


def _progress_rank(rank, port, d):
    """One of two gloo ranks: a signal reaches rank 1 alone, before its step 6 (see the test below)."""
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model = nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    progress = Progress(os.path.join(d, "run"), model=model, optimizer=opt,
                        scaler=torch.amp.GradScaler("cpu", enabled=False), total=100, save_every=50, log_every=8, rank=rank,
                        agree_every=4)
    result = dict(step=None)
    try:
        with progress:
            while not progress.done:
                progress.stop |= rank == 1 and progress.step == 5
                progress.update(torch.tensor(rank + 1.0), 2)  # rank 0's loss is 1, rank 1's is 2
    except SystemExit as e:
        result = dict(step=progress.step, loss=progress.loss, error=str(e))
    with open(os.path.join(d, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    torch.distributed.destroy_process_group()


def test_ranks_stop_together_and_log_the_mean_loss(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_progress_rank, args=(port, str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # both stop at the next agreement step (8), not rank 1 alone at 6 with rank 0 hung in its next all-reduce
    assert [r["step"] for r in ranks] == [8, 8] and all("interrupted at step 8" in r["error"] for r in ranks)
    assert [r["loss"] for r in ranks] == [1.5, 1.5]  # the mean over ranks, not rank 0's own
    assert checkpoints.load_checkpoint(tmp_path / "run.state", kinds=("resume",))["step"] == 8


# ----------------------------------------------------------------- the step loop, bench.py, loaders
def test_step_loop_reads_nothing_back_between_logging_intervals(tmp_path, monkeypatch):
    """The CPU stand-in for the CUDA sync check below: every Python-level way to read a tensor back to
    the host raises, through online and cached steps with a loss-scaled fused AdamW (fp16's path)."""
    teacher, _, t_cfg = models.create_model("test_vit", 10, img_size=32)
    student, _, s_cfg = models.create_model("test_resnet", 10, img_size=32)
    student, cl = training.prepare(student, torch.device("cpu"))
    teacher = teacher.eval().requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3, fused=True)  # no per-step .item() on the step count
    scaler, autocast = torch.amp.GradScaler("cpu"), training.amp(torch.device("cpu"))[0]
    progress = Progress(str(tmp_path / "s"), model=student, optimizer=opt, scaler=scaler, total=10, save_every=3,
                        log_every=3)
    x, prob, cls = torch.rand(8, 3, 32, 32), torch.rand(8, 4).softmax(-1).half(), torch.randint(0, 10, (8, 4))

    def host_read(*args, **kwargs):
        raise RuntimeError("host read")
    for name in ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    with progress:
        t_logits = distill.teacher_outputs(teacher, x, t_cfg, autocast)
        loss = distill.student_step(student, opt, scaler, autocast, x, s_cfg, t_logits, 2.0, cl)  # online
        progress.update(loss, len(x))
        loss = distill_cached.student_step(student, opt, scaler, autocast, x, s_cfg, prob, cls, 2.0, cl)  # cached
        progress.update(loss, len(x))
        with pytest.raises(RuntimeError, match="host read"):  # the logging interval reads the loss: once
            progress.update(loss, len(x))


def test_bench_runs_every_mode_on_the_cpu(capsys):
    table = run(bench, "--teacher", "test_vit", "--student", "test_resnet", "--img-size", 32,
                "--batch-size", 8, "--steps", 2, "--warmup", 1)
    assert set(table) == {"a_teacher", "b_student", "c_naive", "d_shipped", "e_cached"}
    assert all(v > 0 for v in table.values())
    out = capsys.readouterr().out
    assert "d/a" in out and "d/c" in out and "e/b" in out


def test_loaders_use_at_most_one_worker_per_core():
    cores = os.cpu_count()
    assert data.loader(data.Images(["demo:train:0"]), 1, None, workers=cores + 7).num_workers == cores
    assert data.loader(data.Images(["demo:train:0"]), 1, None, workers=1).num_workers == 1


# ------------------------------------------------------------------------ the GPU recipe, on the CPU
def test_the_precision_is_chosen_in_one_place(cpu):
    cpu_device = torch.device("cpu")
    assert training.amp_dtype(cpu_device) is None and training.amp_dtype(cpu_device, "bf16") == torch.bfloat16
    assert training.amp_dtype(cpu_device, "fp16") == torch.float16 and training.amp_dtype(cpu_device, "off") is None
    autocast, scaler = training.amp(cpu_device, "fp16")  # fp16 scales the loss, bf16 needs not
    assert scaler.is_enabled() and not training.amp(cpu_device, "bf16")[1].is_enabled()
    with autocast():
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.float16
    # channels_last is the GPU's alone (CUDA tests): on the CPU, PyTorch's NHWC convolution backward crashes
    # (SIGSEGV, torch 2.14) on a strided 1x1 convolution of a 3-channel image, FastViT's stem
    model, channels_last = training.prepare(models.create_model("test_resnet", 10, img_size=32)[0], cpu_device,
                                            amp_mode="bf16")
    assert not channels_last and all(m.weight.is_contiguous() for m in model.modules() if isinstance(m, torch.nn.Conv2d))


def _recipe_runs(d, tmp_path, *extra):
    """Every training step, short, on the tiny task, with extra flags: -> {step: its checkpoint}."""
    quick = ["--workers", 0, "--batch-size", 20, *extra]  # 40 labeled images: no ragged batch to compile again
    split = task_args(d)
    out = lambda name: tmp_path / f"{name}.pt"
    torch.manual_seed(0)
    run(teacher, *split, "--model", "test_resnet", *TINY, "--weights", "none", "--epochs", 1, *quick, "--out", out("teacher"))
    run(distill, "--teacher", out("teacher"), "--student", d / "student.pt", "--transfer", d / "transfer.txt",
        "--epochs", 1, *quick, "--out", out("distill"))
    run(distill_agnostic, "--vfm", "test_resnet", "--vfm-weights", d / "vfm.pth", *TINY, "--student", d / "student.pt",
        "--transfer", d / "transfer.txt", "--epochs", 1, *quick, "--out", out("distill_agnostic"))
    run(cache_teacher, "--teacher", out("teacher"), "--student", d / "student.pt", "--transfer", d / "transfer.txt",
        "--views", 2, "--topk", 4, "--workers", 0, *extra, "--out", tmp_path / "cache")
    run(distill_cached, "--cache", tmp_path / "cache", "--student", d / "student.pt", "--epochs", 1, *quick,
        "--out", out("distill_cached"))
    run(finetune, *split, "--student", out("distill"), "--teacher", out("teacher"), "--epochs", 1, *quick,
        "--out", out("finetune"))
    names = ("teacher", "distill", "distill_agnostic", "distill_cached", "finetune")
    return {n: checkpoints.load_checkpoint(out(n), kinds=("teacher", "student")) for n in names}


@pytest.fixture(scope="module")
def recipe_task(tmp_path_factory):
    """The tiny task for the recipe tests: demo split, a random test_resnet student, 40 transfer images, a VFM
    file. Every model is a test_resnet at 32px in batches of 20, so that --compile compiles few graphs."""
    d = tmp_path_factory.mktemp("recipe")
    run(student, *task_args(d), "--model", "test_resnet", *TINY, "--out", d / "student.pt")
    (d / "transfer.txt").write_text("\n".join(f"demo:train:{i}" for i in range(40)))  # 38 + 2 held out
    torch.manual_seed(0)
    torch.save(models.create_model("test_resnet", 10, img_size=32)[0].state_dict(), d / "vfm.pth")
    return d


def test_every_training_step_runs_the_gpu_recipe_on_the_cpu(recipe_task, tmp_path, cpu, monkeypatch):
    """--amp bf16: the lines a GPU runs (bf16 autocast, fused AdamW; channels_last is the GPU's alone) run
    here, in every training step: finite losses, within bf16's tolerance of the float32 run."""
    laid_out = []
    real_prepare = training.prepare
    monkeypatch.setattr(training, "prepare", lambda *a, **k: laid_out.append(real_prepare(*a, **k)[1]) or
                        real_prepare(*a, **k))
    fp32 = _recipe_runs(recipe_task, tmp_path / "fp32")
    bf16 = _recipe_runs(recipe_task, tmp_path / "bf16", "--amp", "bf16")
    assert len(laid_out) == 2 * 5 and not any(laid_out)  # every trained model prepared; NHWC on a GPU alone
    for step in fp32:
        loss = lambda c: next(v for k, v in c["metrics"].items() if k.endswith("loss"))
        assert math.isfinite(loss(bf16[step])) and loss(bf16[step]) == pytest.approx(loss(fp32[step]), rel=0.1), step
        a, b = fp32[step]["model"], bf16[step]["model"]
        assert a.keys() == b.keys()
        diff = sum((a[k].float() - b[k].float()).norm() ** 2 for k in a if a[k].is_floating_point()) ** 0.5
        norm = sum(a[k].float().norm() ** 2 for k in a if a[k].is_floating_point()) ** 0.5
        assert diff / norm < 0.02, (step, float(diff / norm))  # a few steps apart in bf16: close, not equal


def test_compiled_steps_save_their_weights_under_their_plain_names(recipe_task, tmp_path, cpu):
    """--compile on the CPU (torch.compile's inductor backend) with the GPU recipe, in every training step:
    the checkpoints hold the plain module's names, and load into the plain model."""
    for step, ckpt in _recipe_runs(recipe_task, tmp_path, "--amp", "bf16", "--compile").items():
        assert not any("_orig_mod" in k or k.startswith("module.") for k in ckpt["model"]), step
        models.load_model(ckpt)  # every key fits the model its recipe builds
        assert all(math.isfinite(v) for k, v in ckpt["metrics"].items() if isinstance(v, float)), step


# ---------------------------------------------------------------------------------------- CUDA only
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_cuda_precision_and_kernel_choices():
    device = torch.device("cuda")
    autocast, scaler = training.amp(device)
    with autocast():
        y = torch.nn.Linear(8, 8).cuda()(torch.randn(2, 8, device=device))
    assert y.dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    assert scaler.is_enabled() == (not torch.cuda.is_bf16_supported())
    student = models.create_model("test_resnet", 10, img_size=32)[0].cuda()
    student, channels_last = training.prepare(student, device)
    conv = next(m for m in student.modules() if isinstance(m, torch.nn.Conv2d))
    assert channels_last and conv.weight.is_contiguous(memory_format=torch.channels_last)
    vit = training.prepare(models.create_model("test_vit", 10, img_size=32)[0].cuda(), device)[1]
    assert not vit  # a ViT student stays NCHW
    import timm.layers
    assert timm.layers.use_fused_attn()  # timm ViTs call F.scaled_dot_product_attention


@cuda
def test_cuda_step_loop_never_waits_for_the_gpu():
    device = torch.device("cuda")
    autocast, scaler = training.amp(device)
    teacher, t_recipe, t_cfg = models.create_model("test_vit", 10, img_size=32)
    student, _, s_cfg = models.create_model("test_resnet", 10, img_size=32)
    teacher = teacher.to(device).eval().requires_grad_(False)
    student, cl = training.prepare(student.to(device), device)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3, fused=True)
    x = torch.rand(16, 3, 32, 32, device=device)
    for sync_mode in (0, "error"):  # the first pass warms up lazy inits (cuBLAS handles, etc.)
        torch.cuda.set_sync_debug_mode(sync_mode)
        try:
            for _ in range(3):
                t = distill.teacher_outputs(teacher, x, t_cfg, autocast)
                loss = distill.student_step(student, opt, scaler, autocast, x, s_cfg, t, 2.0, cl)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss)


@cuda
def test_cuda_compiled_distillation_saves_plain_weights(tiny, tmp_path):
    out = tmp_path / "kt.pt"
    args = ["--teacher", tiny / "teacher.pt", "--student", tiny / "student.pt", "--transfer", tiny / "transfer.txt",
            "--epochs", 4, "--batch-size", 8, "--workers", 2, "--compile", "--out", out]
    run(distill, *args)
    ckpt = checkpoints.load_checkpoint(out, kinds=("student",))  # compiled weights save under their plain names
    assert not any("_orig_mod" in k or k.startswith("module.") for k in ckpt["model"])
    assert math.isfinite(ckpt["metrics"]["distill_loss"]) and ckpt["cost"][-1]["steps"] == 12


@cuda
def test_cuda_cache_is_built_and_replayed_on_the_gpu(tiny, tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "kt.pt"
    run(cache_teacher, *cache_args(tiny, cache))
    meta, c, cost = distill_cached.load_cache(cache)
    assert c["prob"].dtype == torch.float16 and torch.isfinite(c["prob"].float()).all()
    assert (c["prob"].float().sum(-1) <= 1.01).all() and cost["images"] == 24 * 3
    run(distill_cached, "--student", tiny / "student.pt", "--cache", cache, "--epochs", 3, "--batch-size", 8,
        "--workers", 2, "--out", out)
    ckpt = checkpoints.load_checkpoint(out, kinds=("student",))
    assert math.isfinite(ckpt["metrics"]["distill_loss"]) and ckpt["cost"][-1]["teacher_images"] == 0


@cuda
def test_cuda_segmentation_distills_and_scores_under_amp(seg, tmp_path):
    run(distill, "--teacher", seg / "teacher.pt", "--student", seg / "student.pt", "--transfer", seg / "small.txt",
        "--epochs", 2, "--batch-size", 16, "--workers", 2, "--out", tmp_path / "kt.pt")  # bf16 autocast on the GPU
    ckpt = checkpoints.load_checkpoint(tmp_path / "kt.pt", kinds=("student",))
    assert math.isfinite(ckpt["metrics"]["distill_loss"]) and math.isfinite(ckpt["metrics"]["held_out_kd"])
    table = run(evaluate, "--split", seg / "split.json", "--workers", 2, "--out",
                tmp_path / "results.json", f"teacher={seg / 'teacher.pt'}", f"kt={tmp_path / 'kt.pt'}")
    assert all(0 <= row["miou"] <= 100 and row["device"].startswith("cuda") for row in table.values())
