"""Tests: the concepts (KD loss, label budget, checkpoints, transforms), the pipeline end to end on the
generated demo data with tiny random models, resume after a kill, and bad inputs. Offline, CPU only.

Run: python -m pytest -q test_all.py
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import distill
import evaluate
import finetune
import student
import task
import teacher
import transfer_set

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--img-size", "32"]


def run(module, *argv):
    """Call a step's main() in-process with command-line arguments, as run.sh would."""
    return module.main(module.get_args_parser().parse_args([str(a) for a in argv]))


def task_args(d):
    return ["--dataset", "demo", "--shots", 4, "--seed", 0, "--split", d / "split.json"]


# ------------------------------------------------------------------------------------------ concepts
def test_kd_loss_is_zero_when_logits_match_and_positive_otherwise():
    t = torch.randn(8, 5)
    assert distill.kd_loss(t.clone(), t, T=2.0).abs() < 1e-6
    assert distill.kd_loss(torch.randn(8, 5), t, T=2.0) > 0


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


def test_label_budget_is_deterministic_balanced_and_disjoint():
    labels = np.repeat(np.arange(5), 20).tolist()
    a, rest = task.label_budget(labels, 3, seed=1)
    assert (a, rest) == task.label_budget(labels, 3, seed=1)
    assert a != task.label_budget(labels, 3, seed=2)[0]
    assert np.bincount(np.asarray(labels)[a]).tolist() == [3] * 5
    assert sorted(a + rest) == list(range(100)) and not set(a) & set(rest)


def test_label_budget_takes_all_of_a_small_class_with_a_warning():
    labels = [0] * 10 + [1] * 2
    with pytest.warns(UserWarning, match="fewer than --shots"):
        labeled, _ = task.label_budget(labels, 4, seed=0)
    assert sum(labels[i] == 1 for i in labeled) == 2 and sum(labels[i] == 0 for i in labeled) == 4


def test_split_is_recorded_once_and_mismatches_are_refused(tmp_path):
    s = task.load_split(tmp_path / "split.json", "demo", 3, 0)
    assert task.load_split(tmp_path / "split.json", "demo", 3, 0) == s
    with pytest.raises(SystemExit, match="records"):
        task.load_split(tmp_path / "split.json", "demo", 5, 0)


def test_transforms_follow_each_models_data_config():
    for arch, size in (("test_vit", 48), ("test_resnet", 40)):
        _, _, cfg = task.create_model(arch, 3, img_size=size)
        gray = __import__("PIL.Image").Image.new("RGB", (70, 90), (128, 128, 128))
        x = task.transform(cfg, train=False)(gray)
        assert x.shape == (3, size, size)
        expect = (128 / 255 - torch.tensor(cfg["mean"])) / torch.tensor(cfg["std"])
        torch.testing.assert_close(x.mean((1, 2)), expect, atol=1e-2, rtol=0)
    raw = torch.rand(2, 3, 64, 64)
    y = task.normalize(raw, dict(cfg, mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3]))
    assert y.shape == (2, 3, 40, 40)


def test_open_clip_tower_uses_its_own_preprocessing(tmp_path):
    path = tmp_path / "tiny-clip.json"
    path.write_text(json.dumps({"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32,
                                "patch_size": 8, "head_width": 16},
                                "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 16,
                                             "heads": 2, "layers": 1}}))
    model, recipe, cfg = task.create_model(f"open_clip:{path}", 4)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    assert cfg["input_size"] == [3, 32, 32] and abs(cfg["mean"][0] - 0.4815) < 1e-3  # OpenAI CLIP mean
    ckpt = dict(recipe=recipe, model=model.state_dict())
    torch.testing.assert_close(task.load_model(ckpt)(torch.ones(1, 3, 32, 32)), model(torch.ones(1, 3, 32, 32)))


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    run(student, *task_args(tmp_path), "--model", "test_resnet", *TINY, "--out", tmp_path / "s.pt")
    ckpt = torch.load(tmp_path / "s.pt", weights_only=True)  # plain types only: no pickled objects
    assert ckpt["kind"] == "student" and ckpt["recipe"]["arch"] == "test_resnet"
    model = task.load_model(ckpt).eval()
    ref = task.create_model("test_resnet", 10, img_size=32)[0]
    torch.manual_seed(0)  # student.py seeds its init with --seed 0
    ref = task.create_model("test_resnet", 10, img_size=32)[0].eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), ref(x))
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # atomic write left no temp file


# ------------------------------------------------------------------------------------- the pipeline
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


def test_pipeline_end_to_end(pipeline):
    d = pipeline
    split = json.loads((d / "split.json").read_text())
    assert len(split["labeled"]) == 40 and len(split["labeled"]) + len(split["unlabeled"]) == 1200
    assert len((d / "transfer.txt").read_text().split()) == len(split["unlabeled"])
    kt = torch.load(d / "kt_ft.pt", weights_only=True)
    assert [c["step"] for c in kt["cost"]] == ["teacher", "distill", "finetune"]
    assert not list(d.glob("*.state"))  # resumable states are removed once a step is done
    table = run(evaluate, "--dataset", "demo", "--workers", 0, "--out", d / "results.json",
                f"teacher={d / 'teacher.pt'}", f"kt={d / 'kt_ft.pt'}", f"kt@1={d / 'kt.pt'}")
    assert list(table) == ["teacher", "kt"] and table["kt"]["seeds"] == 2
    for row in table.values():
        assert 0 <= row["top1"] <= 100 and row["params_m"] > 0 and row["gflops"] > 0
    assert (d / "results.md").read_text().count("\n| ") == 2


def test_every_step_answers_help(capsys):
    for module in (teacher, student, transfer_set, distill, finetune, evaluate):
        with pytest.raises(SystemExit) as e:
            module.get_args_parser().parse_args(["--help"])
        assert e.value.code == 0 and "usage" in capsys.readouterr().out


# ---------------------------------------------------------------------------------- resume and faults
def _distill_cmd(d, out):
    return [sys.executable, "distill.py", "--teacher", d / "teacher.pt", "--student", d / "student.pt",
            "--transfer", d / "transfer.txt", "--epochs", 2, "--batch-size", 32, "--workers", 0,
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


# ---------------------------------------------------------------------------------------- bad input
def test_bad_inputs_fail_with_one_line_and_keep_files(pipeline, tmp_path):
    d = pipeline
    keep = tmp_path / "kt.pt"
    keep.write_bytes(b"precious")
    cases = [
        (teacher, [*task_args(tmp_path), "--dataset", "nosuchdata", "--out", keep], "unknown dataset"),
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
    model, recipe, cfg = task.create_model("test_resnet", 3, img_size=32)
    task.save_checkpoint(dict(kind="student", recipe=recipe, data_config=cfg, classes=["a", "b", "c"],
                              model=model.state_dict(), cost=[]), other)
    cases.append((distill, ["--teacher", d / "teacher.pt", "--student", other, "--transfer",
                            d / "transfer.txt", "--out", keep], "teacher has 10 classes, student 3"))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((d / "teacher.pt").read_bytes()[:1000])
    cases.append((evaluate, ["--dataset", "demo", f"t={truncated}", "--out", keep], "not a readable"))
    for module, argv, message in cases:
        with pytest.raises(SystemExit, match=message) as e:
            run(module, *argv)
        assert "\n" not in str(e.value)
        assert keep.read_bytes() == b"precious"


def _folder_dataset(root, train_classes=("cat", "dog"), test_classes=("cat", "dog"), n=3):
    from PIL import Image
    for split, classes in (("train", train_classes), ("test", test_classes)):
        for c in classes:
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(n):
                Image.new("RGB", (20, 20), (40 * i, 100, 7)).save(root / split / c / f"{i}.png")
    return f"folder:{root}"


def test_folder_datasets_with_a_wrong_layout_are_refused(tmp_path):
    ok = _folder_dataset(tmp_path / "ok")
    assert task.load_dataset(ok, "train")[2] == ["cat", "dog"]
    with pytest.raises(SystemExit, match="has no test/ folder"):
        task.load_dataset(f"folder:{tmp_path / 'ok' / 'train'}", "test")
    os.makedirs(tmp_path / "empty" / "train" / "cat")  # an empty class
    _folder_dataset(tmp_path / "empty", train_classes=("dog",))
    with pytest.raises(SystemExit, match="cat"):
        task.load_dataset(f"folder:{tmp_path / 'empty'}", "train")
    bad = _folder_dataset(tmp_path / "differ", test_classes=("cat", "cow"))
    with pytest.raises(SystemExit, match="differ from train/ classes"):
        task.load_dataset(bad, "test")


def test_unreadable_images_are_skipped_not_fatal(tmp_path, capsys):
    root = tmp_path / "imgs"
    dataset = _folder_dataset(root, n=2)
    good = task.split_refs(dataset, "train")[0]
    (root / "zero.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("not an image")
    (root / "cut.png").write_bytes(open(good[0], "rb").read()[:40])
    refs = [str(root / "zero.jpg"), good[0], str(root / "text.jpg"), str(root / "cut.png"), good[1]]
    data = task.Images(refs, None, task.transform(task.create_model("test_resnet", 2, img_size=16)[2], False))
    shapes = [data[i][0].shape for i in range(len(data))]
    assert shapes == [(3, 16, 16)] * 5
    assert capsys.readouterr().err.count("skipped unreadable image") == 3 + 1  # zero.jpg is met twice


def test_local_weights_of_another_architecture_name_the_keys(tmp_path):
    torch.save(task.create_model("test_vit", 5)[0].state_dict(), tmp_path / "vit.pth")
    assert task.create_model("test_vit", 3, weights=str(tmp_path / "vit.pth"), img_size=32)[0]  # new head
    with pytest.raises(SystemExit, match="does not fit ResNet .*missing"):
        task.create_model("test_resnet", 3, weights=str(tmp_path / "vit.pth"))


def test_nan_loss_stops_and_keeps_the_last_good_state(pipeline, tmp_path):
    d = pipeline
    args = ["--student", d / "student.pt", *task_args(d), "--epochs", 3, "--workers", 0, "--save-every", 1,
            "--out", tmp_path / "ft.pt"]
    with pytest.raises(SystemExit, match="loss is nan"):
        run(finetune, *args, "--lr", 1e30)
    state = torch.load(tmp_path / "ft.pt.state", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (tmp_path / "ft.pt").exists()


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    task.save_checkpoint({"kind": "student", "v": torch.ones(3)}, path)

    def full_disk(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError):
        task.save_checkpoint({"kind": "student", "v": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(task.load_checkpoint(path)["v"], torch.ones(3))
    assert os.listdir(tmp_path) == ["ckpt.pt"]
