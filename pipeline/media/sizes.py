"""The output-size policy: aspect-ratio buckets (BUCKETS, choose_size) and resize-to-cover + centre crop
(fit_to). Light to import (farm/config.py needs choose_size at start-up): torch is imported by fit_to."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


# (key, height, width). The key is the bucket's height / width, rounded to 2 decimals; a source picks the
# bucket whose key is nearest to its own height / width (first one on a tie), as the official code does.
# The "infinitetalk-*" tables are the official ASPECT_RATIO_627 / ASPECT_RATIO_960 (wan/utils/multitalk_utils.py),
# which its `size` 'infinitetalk-480' / 'infinitetalk-720' select.
_INFINITETALK_480 = (
    (0.26, 320, 1216), (0.38, 384, 1024), (0.50, 448, 896), (0.67, 512, 768), (0.82, 576, 704),
    (1.00, 640, 640), (1.22, 704, 576), (1.50, 768, 512), (1.86, 832, 448), (2.00, 896, 448),
    (2.50, 960, 384), (2.83, 1088, 384), (3.60, 1152, 320), (3.80, 1216, 320), (4.00, 1280, 320))
_INFINITETALK_720 = (
    (0.22, 448, 2048), (0.29, 512, 1792), (0.36, 576, 1600), (0.45, 640, 1408), (0.55, 704, 1280),
    (0.63, 768, 1216), (0.76, 832, 1088), (0.88, 896, 1024), (1.00, 960, 960), (1.14, 1024, 896),
    (1.31, 1088, 832), (1.50, 1152, 768), (1.58, 1216, 768), (1.82, 1280, 704), (1.91, 1344, 704),
    (2.20, 1408, 640), (2.30, 1472, 640), (2.67, 1536, 576), (2.89, 1664, 576), (3.62, 1856, 512),
    (3.75, 1920, 512))


def _with(table, *extra):
    return tuple(sorted(table + extra, key=lambda bucket: bucket[0]))


# "480p" / "720p" (the defaults): the official tables plus Wan2.1's native sizes 832x480 / 480x832 and
# 1280x720 / 720x1280, so that 16:9 and 9:16 sources get the resolution the model was trained at (the official
# 480 table alone gives a 16:9 source 896x448 and a 9:16 one 448x832). Other ratios get the official bucket.
BUCKETS: dict[str, tuple[tuple[float, int, int], ...]] = {
    "480p": _with(_INFINITETALK_480, (0.58, 480, 832), (1.73, 832, 480)),
    "720p": _with(_INFINITETALK_720, (0.56, 720, 1280), (1.78, 1280, 720)),
    "infinitetalk-480": _INFINITETALK_480,
    "infinitetalk-720": _INFINITETALK_720,
}


def choose_size(height: int, width: int,
                target: str | Sequence[tuple[int, int]] = "480p") -> tuple[int, int]:
    """(height, width) of the bucket for a source of height x width: the bucket whose height/width ratio is
    nearest to the source's. `target`: a name in BUCKETS, "WIDTHxHEIGHT" for one fixed size (e.g. "832x480"),
    or your own (height, width) sizes.

    "480p": landscape 16:9 -> (480, 832), portrait 9:16 -> (832, 480), square -> (640, 640), 4:3 -> (576, 704),
    3:4 -> (704, 576).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"source size must be positive, got {height}x{width}")
    if isinstance(target, str) and (fixed := re.fullmatch(r"(\d+)x(\d+)", target)):
        width_px, height_px = int(fixed[1]), int(fixed[2])
        if width_px % 16 or height_px % 16 or not width_px or not height_px:
            raise ValueError(f"size {target!r}: width and height must be positive multiples of 16 (VAE x DiT patch)")
        return height_px, width_px
    if isinstance(target, str):
        if target not in BUCKETS:
            raise ValueError(f"unknown size target {target!r}; known: {', '.join(BUCKETS)}, or WIDTHxHEIGHT")
        table = BUCKETS[target]
    else:
        table = tuple((h / w, h, w) for h, w in target)
    ratio = height / width
    _, bucket_h, bucket_w = min(table, key=lambda bucket: abs(bucket[0] - ratio))
    return bucket_h, bucket_w


def fit_to(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize [3, H, W] or [T, 3, H, W] (floating point) to cover height x width, keeping the aspect ratio,
    and centre-crop to exactly that; the official resize_and_centercrop's geometry (scale = the larger of the
    two ratios, scaled size rounded up, crop offset round((scaled - target) / 2)). Resampling is bilinear
    with antialiasing (as PIL's bilinear, which the official uses for images)."""
    if not frames.is_floating_point():
        raise TypeError(f"fit_to expects floating-point frames, got {frames.dtype}")
    import torch.nn.functional as F  # here, not at the top: choose_size alone should not cost a torch import

    batch = frames[None] if frames.dim() == 3 else frames
    src_h, src_w = batch.shape[-2:]
    scale = max(height / src_h, width / src_w)
    # The 1e-6 keeps a product like 1080 * (480 / 1080) = 480.00000000000006 from rounding up to 481.
    scaled_h = max(height, math.ceil(src_h * scale - 1e-6))
    scaled_w = max(width, math.ceil(src_w * scale - 1e-6))
    if (scaled_h, scaled_w) != (src_h, src_w):
        batch = F.interpolate(batch.float(), size=(scaled_h, scaled_w), mode="bilinear", antialias=True,
                              align_corners=False).to(frames.dtype)
    top, left = round((scaled_h - height) / 2), round((scaled_w - width) / 2)
    batch = batch[..., top:top + height, left:left + width].contiguous()
    return batch[0] if frames.dim() == 3 else batch
