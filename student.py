"""Step 2, the student: create the small task model that will be deployed, before any training.

The paper's point (Vemulapalli et al., ICML 2024, arXiv 2311.18237, Sec. 4) is which *initialisation and
training* gives a small model the most accuracy from few labels; the architecture is the user's choice,
driven by the target device: fastvit_t8, mobilevitv2_100, mobilenetv3_large_100, resnet18, resnet50,
convnext_atto, ... any timm model. It starts from random weights (`--weights none`, the paper's
task-oriented transfer does not need ImageNet pretraining), from ImageNet weights (`--weights hub`, the
usual baseline), or from a local file (`--weights PATH`, offline users).

Reads:  split.json (for the class names; made on first use).
Writes: student.pt = {kind: "student", recipe, data_config, classes, model, args, cost: []}.
Run:    python student.py --dataset eurosat --shots 10 --model fastvit_t8 --img-size 224 \
            --split runs/eurosat/split.json --out runs/eurosat/student_scratch.pt
"""
import argparse

import task


def get_args_parser():
    p = argparse.ArgumentParser(description="student: create a small timm model for the task",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    task.add_task_args(p)
    p.add_argument("--model", default="fastvit_t8", help="any timm model: fastvit_t8, mobilevitv2_100, "
                   "mobilenetv3_large_100, resnet18, resnet50, convnext_atto, ...")
    p.add_argument("--weights", default="none", help="none (random init), hub (ImageNet), or a local file")
    p.add_argument("--img-size", type=task.positive, default=None, help="input resolution (default: the model's)")
    p.add_argument("--out", default="runs/demo/student_scratch.pt")
    return p


def main(args):
    import torch
    torch.manual_seed(args.seed if args.train_seed is None else args.train_seed)
    split = task.load_split(args.split, args.dataset, args.shots, args.seed, args.data_root)
    if args.model.startswith("open_clip:"):
        task.fail("students are timm models; a VFM belongs in teacher.py")
    model, recipe, cfg = task.create_model(
        args.model, len(split["classes"]), pretrained=args.weights == "hub",
        weights=None if args.weights in ("hub", "none") else args.weights, img_size=args.img_size)
    params = sum(p.numel() for p in model.parameters())
    task.save_checkpoint(dict(kind="student", recipe=recipe, data_config=cfg, classes=split["classes"],
                              model=model.state_dict(), args=task.plain(args), cost=[]), args.out)
    print(f"wrote {args.out}: {args.model}, {params / 1e6:.2f}M parameters, init {args.weights}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
