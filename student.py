"""Step 2, the student: create the small model that will be deployed, before any training.

Any timm model the target device can run (fastvit_t8, mobilevitv2_100, mobilenetv3_large_100, resnet18,
...), from random weights (`--weights none`: task-oriented transfer needs no pretraining), ImageNet
weights (`--weights hub`, the usual baseline) or a local file (`--weights PATH`, offline machines).
For segmentation the same backbone gets a light decoder (LR-ASPP) and outputs logits at 1/8.

Reads:  split.json (split.py), for the class names.
Uses:   kt.data, kt.models; kt.checkpoints, kt.claims, kt.checks; where used: kt.segmenters.
Writes: student.pt = {kind: "student", recipe, data_config, classes, model, args, init, cost: []}; init
        names the weights it starts from (base_model: their Hub id, for export.py's model card).
Run:    python student.py --split runs/eurosat/split.json --model fastvit_t8 --img-size 224 \
            --out runs/eurosat/student_scratch.pt
"""
import argparse

import torch

from kt import checkpoints, claims, data, models
from kt.checks import fail, positive


def get_args_parser():
    p = argparse.ArgumentParser(description="student: create a small timm model for the task",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--split", default="runs/demo/split.json", help="split.json (split.py): the task's classes")
    p.add_argument("--train-seed", type=int, default=0, help="seeds the random initialisation")
    p.add_argument("--model", default="fastvit_t8", help="any timm model: fastvit_t8, mobilevitv2_100, "
                   "mobilenetv3_large_100, resnet18, resnet50, convnext_atto, ...")
    p.add_argument("--weights", default="none", help="none (random init), hub (ImageNet), or a local file")
    p.add_argument("--img-size", type=positive, default=None, help="input resolution (default: the model's)")
    p.add_argument("--decoder", default="lraspp", choices=["lraspp", "linear"], help="segmentation only: "
                   "LR-ASPP on its 1/8 and last feature maps, or a linear head on the last map")
    p.add_argument("--out", default="runs/demo/student_scratch.pt")
    return p


def main(args):
    claims.check_writable(args.out, reads=(args.split, args.weights))
    torch.manual_seed(args.train_seed)  # the random initialisation
    split = data.read_split(args.split)
    if args.model.startswith("open_clip:"):
        fail("students are timm models; a VFM belongs in teacher.py")
    model, recipe, cfg = models.create_model(
        args.model, len(split["classes"]), pretrained=args.weights == "hub",
        weights=None if args.weights in ("hub", "none") else args.weights, img_size=args.img_size,
        decoder=args.decoder if data.is_segmentation(split) else None)  # segmentation: a light decoder on its maps
    params = sum(p.numel() for p in model.parameters())
    hub_id = getattr(getattr(model, "backbone", model), "pretrained_cfg", {}).get("hf_hub_id")
    init = dict(weights=args.weights, base_model=hub_id if args.weights == "hub" else None)
    checkpoints.save_checkpoint(dict(kind="student", recipe=recipe, data_config=cfg, classes=split["classes"],
                                     model=model.state_dict(), args=checkpoints.plain(args), init=init, cost=[]),
                                args.out)
    print(f"wrote {args.out}: {args.model}, {params / 1e6:.2f}M parameters, init {args.weights}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
