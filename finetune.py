"""Step 5, finetuning: train a student on the labeled images with cross-entropy.

The last stage of task-oriented knowledge transfer (Vemulapalli et al., ICML 2024, arXiv 2311.18237,
Sec. 3): after distillation on the transfer set, the student is finetuned on the few ground-truth labels.
The same script trains the baselines the paper compares against: a student from random weights (labels
alone) and a student from ImageNet (or CLIP, DINO) pretraining, each with the same labels and budget.

Reads:  a student checkpoint (student.py or distill.py), the dataset and split.json.
Writes: OUT = {kind: "student", recipe, data_config, classes, model, args, metrics, cost};
        OUT.state while training (resumable; deleted when done).
Run:    python finetune.py --dataset eurosat --shots 10 --split runs/eurosat/split.json \
            --student runs/eurosat/student_kt.pt --out runs/eurosat/student_kt_ft.pt
        torchrun --nproc_per_node 8 finetune.py ...   (DDP; the same script runs as one process)
"""
import argparse
import math

import torch
import torch.nn.functional as F

import task


def get_args_parser():
    p = argparse.ArgumentParser(description="finetune: train a student on the labeled images",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    task.add_task_args(p)
    p.add_argument("--student", default="runs/demo/student_kt.pt", help="made by student.py or distill.py")
    p.add_argument("--epochs", type=task.positive, default=30, help="passes over the labeled images")
    p.add_argument("--batch-size", type=task.positive, default=32, help="per process")
    p.add_argument("--lr", type=float, default=5e-4, help="AdamW peak lr; lower (1e-4) after distillation "
                   "keeps more of what the teacher taught, higher (1e-3) suits random init")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of steps with linear lr warmup")
    p.add_argument("--workers", type=task.nonnegative, default=4)
    p.add_argument("--save-every", type=task.positive, default=200, help="steps between resumable states")
    p.add_argument("--resume", action="store_true", help="continue from OUT.state if it exists")
    p.add_argument("--out", default="runs/demo/student_kt_ft.pt")
    return p


def main(args):
    seed = args.seed if args.train_seed is None else args.train_seed
    device, rank, world = task.setup(seed)
    ckpt = task.load_checkpoint(args.student, kinds=("student",), made_by="student.py or distill.py")
    split = task.load_split(args.split, args.dataset, args.shots, args.seed, args.data_root)
    if ckpt["classes"] != split["classes"]:
        task.fail(f"{args.student} has {len(ckpt['classes'])} classes, {args.dataset} has "
                  f"{len(split['classes'])}: it was made for another task")
    model = task.load_model(ckpt).to(device)
    autocast, scaler = task.amp(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                            fused=device.type == "cuda")

    refs, labels = task.split_refs(args.dataset, "train", split["labeled"], args.data_root)
    data = task.Images(refs, labels, task.transform(ckpt["data_config"], train=True), args.data_root)
    sampler = task.EpochSampler(len(data), seed, rank=rank, world=world)
    loader = task.loader(data, args.batch_size, sampler, args.workers, device=device)
    per_epoch = math.ceil(len(sampler) / args.batch_size)
    total, warmup = args.epochs * per_epoch, int(args.warmup * args.epochs * per_epoch)

    progress = task.Progress(args.out + ".state", model, opt, scaler, total, args.save_every, rank,
                             args.resume, per_epoch)
    model = task.ddp(model, device, world)
    model.train()
    task.log(rank, f"finetune {args.student}: {len(data)} labeled images, {total} steps")
    with progress:
        while not progress.done:
            epoch, k = divmod(progress.step, per_epoch)
            sampler.set_epoch(epoch, start=k * args.batch_size)
            for x, y in loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                for g in opt.param_groups:
                    g["lr"] = args.lr * task.cosine_lr(progress.step, total, warmup)
                with autocast():
                    loss = F.cross_entropy(model(x), y, label_smoothing=args.smoothing)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                progress.update(loss, len(x) * world)
                if progress.done:
                    break
    cost = progress.finish("finetune", args.batch_size * world)
    if rank == 0:
        task.save_checkpoint(dict(
            ckpt, model=task.unwrap(model).state_dict(), args=task.plain(args),
            metrics=dict(ckpt.get("metrics", {}), train_loss=progress.loss), cost=ckpt["cost"] + [cost],
            split=dict(dataset=args.dataset, shots=args.shots, seed=args.seed, labeled=split["labeled"])),
            args.out)
        task.log(rank, f"wrote {args.out}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
