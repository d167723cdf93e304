"""The last step's guard: a finetune on a few labels must not take back what distillation gave.

finetune.py measures the student at each log, from the weights it starts from (step 0: the distilled
student) to its last, on unlabeled images it never trains on: the task's unlabeled images that distill.py
holds out (data.hold_out, the same rule: distillation never trained on them either), unaugmented, against the
teacher's logits computed once. The KD loss, top-1 agreement and soft agreement (the teacher's probability of
the student's class) go to the log and OUT.metrics.jsonl, with the val top-1 where split.json has a val part.

At the end it keeps the last weights unless they are worse than the first beyond chance (verdict()): on
the val images where there are some (labels beat the teacher's opinion), else in their agreement with the
teacher, image by image (a one-sided sign test, McNemar's, on the images one of the two gets right and the
other wrong). Then it keeps the first weights and says so in one line. Why not the step where the KD loss
is lowest: on a task where the finetune adds 2-4 points, the student also learns from the labels where the
teacher is wrong, and its KD loss with the teacher rises (docs/last_step.md measured it).
Its measures ride in OUT.state (kt.progress), so a killed finetune resumes to the same choice.
"""
import contextlib
import math

import torch
import torch.nn.functional as F

from kt import models
from kt.training import log, unwrap

SIGNIFICANCE = 0.05  # worse beyond chance: a one-sided sign test below this p-value


@contextlib.contextmanager
def evaluating(model):
    """The model in eval mode, and each of its modules back in its own mode after (a finetune's frozen
    BatchNorm layers stay frozen)."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes.items():
            m.train(training)


@torch.inference_mode()
def logits_of(model, x, cfg, autocast, batch=128):
    """A model's logits (float32) on images x in [0, 1] (B, 3, H, W), in batches, in eval mode."""
    with evaluating(model):
        out = []
        for i in range(0, len(x), batch):
            with autocast():
                out.append(model(models.to_model_input(x[i:i + batch], cfg)).float())
    return torch.cat(out)


@torch.inference_mode()
def val_hits(model, loader, autocast):
    """Whether the model is right on each val image: a loader of (normalised images, labels) -> (N,) bool."""
    hits, device = [], next(model.parameters()).device
    with evaluating(model):
        for x, y in loader:
            with autocast():
                hits.append(model(x.to(device)).argmax(-1).cpu() == y)
    return torch.cat(hits)


def agreement(student_logits, teacher_logits):
    """How the student's predictions agree with the teacher's on the same images: KL(softmax(teacher) ||
    softmax(student)) averaged over them (distill.py's loss at T = 1), the share (%) where both predict the
    same class, and the soft agreement (%): the teacher's probability of the student's class, averaged (the
    student's top-1 if each image's label were drawn from the teacher's probabilities)."""
    p_teacher = F.softmax(teacher_logits, -1)
    predicted = student_logits.argmax(-1)
    kd = F.kl_div(F.log_softmax(student_logits, -1), F.log_softmax(teacher_logits, -1), reduction="batchmean",
                  log_target=True)
    agree = (predicted == teacher_logits.argmax(-1)).float().mean()
    return dict(guard_kd=float(kd), guard_agreement=100 * float(agree),
                guard_soft_agreement=100 * float(p_teacher.gather(1, predicted[:, None]).mean()))


def worse_beyond_chance(before, after):
    """Whether `after` is right on fewer images than `before` beyond chance: the one-sided sign test on the
    images where exactly one of the two is right (McNemar's exact test), at SIGNIFICANCE. before, after: lists
    of 0/1 per image (agrees with the teacher, or matches the val label). -> (worse, lost, gained, p)."""
    lost = sum(1 for b, a in zip(before, after) if b and not a)
    gained = sum(1 for b, a in zip(before, after) if a and not b)
    n = lost + gained
    p = sum(math.comb(n, k) for k in range(lost, n + 1)) / 2 ** n if n else 1.0
    return p < SIGNIFICANCE, lost, gained, p


class Guard:
    """Watches `model` against the teacher's logits on images x (B, 3, H, W in [0, 1]) and, where given, on
    val (a loader of normalised images and labels); measure(step) at each log -> the numbers for the log.
    verdict(first_weights) at the end -> the weights to write and what was chosen. state_dict() and
    load_state_dict() carry its records through OUT.state."""

    def __init__(self, model, cfg, autocast, x=None, teacher_logits=None, val=None):
        self.model, self.cfg, self.autocast, self.x, self.teacher_logits = model, cfg, autocast, x, teacher_logits
        self.val = val
        self.records, self.hits = [], {}  # hits: first and last -> {agreement, val: per-image 0/1 lists}

    def measure(self, step):
        model, record, hits = unwrap(self.model), dict(step=step), {}
        if self.x is not None:
            logits = logits_of(model, self.x, self.cfg, self.autocast)
            record.update(agreement(logits, self.teacher_logits))
            hits["agreement"] = (logits.argmax(-1) == self.teacher_logits.argmax(-1)).int().tolist()
        if self.val is not None:
            right = val_hits(model, self.val, self.autocast)
            record["val_top1"] = 100 * float(right.float().mean())
            hits["val"] = right.int().tolist()
        self.records.append(record)
        self.hits = {"first": self.hits.get("first", hits), "last": hits}  # only the ends are compared
        return {k: v for k, v in record.items() if k != "step"}

    def state_dict(self):
        return dict(records=self.records, hits=self.hits)

    def load_state_dict(self, state):
        self.records, self.hits = state["records"], state["hits"]

    def verdict(self, first_weights, start="the distilled student"):
        """-> (the weights to write, what was chosen for the checkpoint's metrics). The last weights, unless
        they are worse than the first beyond chance: on val where there is one, else in agreement with the
        teacher; then `first_weights`, and one line that says so."""
        last_weights = unwrap(self.model).state_dict()
        if len(self.records) < 2:
            return last_weights, None
        kind = "val" if "val" in self.hits["first"] else "agreement"
        worse, lost, gained, p = worse_beyond_chance(self.hits["first"][kind], self.hits["last"][kind])
        first, last = self.records[0], self.records[-1]
        chosen = dict(kept="first" if worse else "last", test=kind, lost=lost, gained=gained, p=round(p, 4),
                      images=len(self.hits["first"][kind]), first=first, last=last)
        what = "right on val images" if kind == "val" else "agreeing with the teacher on held-out images"
        moved = ", ".join(f"{name} {first[k]:.4g} -> {last[k]:.4g}" for k, name in (
            ("val_top1", "val top-1 %"), ("guard_agreement", "agreement %"), ("guard_kd", "KD loss")) if k in first)
        if worse:
            log(0, f"guard: the finetune made the student worse ({moved}; {what}: {lost} images lost, {gained} "
                   f"gained, p = {p:.3g}): kept {start}")
            return first_weights, chosen
        log(0, f"guard: kept the finetuned weights ({moved}; {what}: {lost} images lost, {gained} gained, "
               f"not worse beyond chance: p = {p:.3g})")
        return last_weights, chosen
