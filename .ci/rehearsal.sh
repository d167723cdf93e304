#!/usr/bin/env bash
# A dress rehearsal of the real path, offline, on the CPU: real architectures with random weights saved to
# local files as a user saves downloaded ones, a small JPEG folder at 224px, every step through run.sh --smoke
# (one short epoch each) with local weights and HF_HUB_OFFLINE=1:
#   the paper's DINOv2 ViT-S/14 teacher -> FastViT-T8, retrieval with an OpenCLIP ViT-B/32 encoder;
#   a DINOv3 ViT-S/16 teacher -> FastViT-MCi0 from MobileCLIP2 weights (the CLIP-pretrained init of the kt
#   rows), retrieval with DINOv3 itself as the encoder (timm:);
#   an OpenCLIP PE-Core-S teacher (a timm trunk; its tag's 0.5/0.5 preprocessing from a file) -> MobileViT-V2;
#   ADE20K segmentation (its layout and split files in miniature) with the PE-Core-S tower segmenting ->
#   FastViT-T8 with LR-ASPP; then the teacher-output cache. What would break on the way to a real run breaks here.
# Usage: bash .ci/rehearsal.sh [WORKDIR]     (CI runs it after the tests)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
[[ -x .venv/bin/python && $PY == python ]] && PY=.venv/bin/python
W=${1:-runs/rehearsal}
export HF_HUB_OFFLINE=1 PY
start=$(date +%s)
rm -rf "$W" && mkdir -p "$W"

$PY - "$W" <<'PYTHON'
import os, sys
import numpy as np
import open_clip, timm, torch
from kt import demo
w = sys.argv[1]
# a task as a folder of JPEGs at 224px: 3 classes, 4 train and 2 test images each; a pool of 12 others
for split, n, offset in (("train", 4, 0), ("test", 2, 50)):
    for c in ("circle", "square", "triangle"):
        os.makedirs(f"{w}/task/{split}/{c}")
        for i in range(n):
            rng = np.random.default_rng(1000 * demo.CLASSES.index(c) + offset + i)
            demo.draw(c, rng, size=224).save(f"{w}/task/{split}/{c}/{i}.jpg", quality=90)
os.makedirs(f"{w}/pool")
for i in range(12):
    demo.dataset("unlabeled")[i][0].resize((224, 224)).save(f"{w}/pool/{i:03d}.jpg", quality=90)
# random weights of the real architectures, saved to files as one saves downloaded weights
torch.save(timm.create_model("vit_small_patch14_dinov2.lvd142m").state_dict(), f"{w}/dinov2_vits14.pth")
torch.save(timm.create_model("vit_small_patch16_dinov3.lvd1689m").state_dict(), f"{w}/dinov3_vits16.pth")
torch.save(timm.create_model("fastvit_t8").state_dict(), f"{w}/fastvit_t8.pth")
torch.save(timm.create_model("fastvit_mci0.apple_mclip2_dfndr2b").state_dict(), f"{w}/fastvit_mci0_mclip2.pth")
torch.save(timm.create_model("fastvit_mci0").state_dict(), f"{w}/fastvit_mci0.pth")
torch.save(timm.create_model("mobilevitv2_050").state_dict(), f"{w}/mobilevitv2_050.pth")
torch.save(open_clip.create_model("ViT-B-32").state_dict(), f"{w}/open_clip_vit_b_32.bin")
torch.save(open_clip.create_model("PE-Core-S-16-384").state_dict(), f"{w}/pe_core_s.bin")  # its file: no tag in it
# ADE20K in miniature (ADEChallengeData2016's layout, 224px scenes, masks with 0 = other) and split files
from PIL import Image
base = f"{w}/data/ADEChallengeData2016"
for part, prefix, n in (("training", "ADE_train", 8), ("validation", "ADE_val", 3)):
    os.makedirs(f"{base}/images/{part}"), os.makedirs(f"{base}/annotations/{part}")
    for i in range(1, n + 1):
        img, mask = demo.scene(7_000_000 + 100 * (part == "validation") + i)
        img.resize((224, 224)).save(f"{base}/images/{part}/{prefix}_{i:08d}.jpg", quality=90)
        Image.fromarray(mask + 1).resize((224, 224), Image.NEAREST).save(f"{base}/annotations/{part}/{prefix}_{i:08d}.png")
os.makedirs(f"{w}/ADE20K")
names = lambda prefix, ids: "".join(f"{prefix}_{i:08d}.jpg\n" for i in ids)
open(f"{w}/ADE20K/train_full.txt", "w").write(names("ADE_train", range(1, 7)))
open(f"{w}/ADE20K/train_2img.txt", "w").write(names("ADE_train", (1, 2)))
open(f"{w}/ADE20K/val.txt", "w").write(names("ADE_train", (7, 8)))
open(f"{w}/ADE20K/test.txt", "w").write(names("ADE_val", (1, 2, 3)))
print(f"rehearsal data and weights in {w}")
PYTHON

TASK=(--shots 2 --img-size 224 --smoke)
# DINOv2 teacher -> FastViT student, a generic pool and retrieval with an OpenCLIP encoder
bash run.sh "folder:$W/task" "${TASK[@]}" --teacher vit_small_patch14_dinov2.lvd142m \
  --teacher-weights "$W/dinov2_vits14.pth" --student fastvit_t8 --init "imagenet=$W/fastvit_t8.pth" \
  --pool "$W/pool" --embed open_clip:ViT-B-32 --embed-weights "$W/open_clip_vit_b_32.bin" --out "$W/dinov2"
# The teachers of 2026: DINOv3 -> FastViT-MCi0 from MobileCLIP2's weights, DINOv3 also the retrieval encoder
bash run.sh "folder:$W/task" "${TASK[@]}" --teacher vit_small_patch16_dinov3.lvd1689m \
  --teacher-weights "$W/dinov3_vits16.pth" --student fastvit_mci0 --init "imagenet=$W/fastvit_mci0.pth" \
  --init "clip=$W/fastvit_mci0_mclip2.pth" --kt-init clip --pool "$W/pool" \
  --embed timm:vit_small_patch16_dinov3.lvd1689m --embed-weights "$W/dinov3_vits16.pth" --out "$W/dinov3"
# an OpenCLIP tower on a timm trunk (PE-Core) -> MobileViT-V2 student
bash run.sh "folder:$W/task" "${TASK[@]}" --teacher open_clip:PE-Core-S-16-384/meta \
  --teacher-weights "$W/pe_core_s.bin" --student mobilevitv2_050 \
  --init "imagenet=$W/mobilevitv2_050.pth" --out "$W/pe_core"
# ADE20K segmentation with the paper's split files: the PE-Core tower segments (a linear head on its trunk's
# patch tokens) -> FastViT LR-ASPP, retrieval by --total
DATA_ROOT=$W/data bash run.sh ade20k --split-files "$W/ADE20K" --budget train_2img --img-size 224 --smoke \
  --teacher open_clip:PE-Core-S-16-384/meta --teacher-weights "$W/pe_core_s.bin" --student fastvit_t8 \
  --init "imagenet=$W/fastvit_t8.pth" --pool "$W/pool" --embed open_clip:ViT-B-32 \
  --embed-weights "$W/open_clip_vit_b_32.bin" --out "$W/ade20k"
# the teacher-output cache, then a student trained from it alone
D=$W/dinov2
$PY cache_teacher.py --teacher "$D/teacher.pt" --student "$D/s0/student_scratch.pt" \
  --transfer "$D/transfer_target.txt" --views 2 --topk 3 --batch-size 8 --workers 0 --out "$W/cache"
$PY distill_cached.py --cache "$W/cache" --student "$D/s0/student_scratch.pt" --epochs 1 --batch-size 4 \
  --workers 0 --out "$W/kt_cached.pt"
echo "rehearsal passed in $(( $(date +%s) - start )) s"
