"""The teacher-output cache's views (cache_teacher.py writes them, distill_cached.py replays them).

A cache DIR holds meta.json (teacher, transfer list, refs, views K, topk, view size, ...) and
shard_NNNNN.pt = {index (n,), box (n, K, 4) int32 top/left/height/width in source pixels, flip (n, K) bool,
prob (n, K, k) fp16, cls (n, K, k) int16}. A view is rebuilt from its source image, box and flip alone.
"""
import os
import sys
import zipfile

import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from kt import data


def cache_shard(cache_dir, s):
    """DIR/shard_00042.pt holds images 42 * shard_size ... 43 * shard_size - 1."""
    return os.path.join(cache_dir, f"shard_{s:05d}.pt")


def shard_done(cache_dir, s):
    """Whether shard s is there and whole (a torch file is a zip: a truncated one has no central directory);
    cache_teacher.py makes a shard that is not, distill_cached.py refuses to start without it."""
    return zipfile.is_zipfile(cache_shard(cache_dir, s))


def open_or_gray(ref, root):
    """An image, or a gray 32x32 stand-in for an unreadable one: building and replay agree either way."""
    try:
        return data.open_image(ref, root)
    except (Exception, SystemExit) as e:  # any per-image failure
        print(f"warning: unreadable image {ref} ({type(e).__name__}): a gray stand-in", file=sys.stderr)
        return Image.new("RGB", (32, 32), (128, 128, 128))


def make_view(img, box, flip, size, interpolation):
    """Crop box (top, left, height, width) of a PIL image, resized to size x size, flipped -> (3, S, S)."""
    top, left, h, w = (int(v) for v in box)
    x = TF.resized_crop(img, top, left, h, w, [size, size], InterpolationMode(interpolation))
    return TF.to_tensor(TF.hflip(x) if flip else x)  # pixels in [0, 1], as online
