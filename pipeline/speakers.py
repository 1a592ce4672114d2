"""Two speakers: their audio on one timeline and the image regions each voice drives.

`para`: both tracks play at once (the shorter is padded with silence; the official code requires equal
lengths). `add`: speaker 1 speaks, then speaker 2; each is silent while the other speaks.

Regions: boxes in source-image pixels (left, top, right, bottom; see pipeline.job.Box), or by default
the official left/right halves with a 5% margin. The masks go through the same resize-to-cover and
centre crop as the image, so they stay on the faces they were drawn on.
"""

import numpy as np
import torch

from pipeline import media
from pipeline.job import Box

DEFAULT_MARGIN = 0.05  # the official face_scale


def arrange_speakers(tracks: list[np.ndarray], audio_type: str) -> list[np.ndarray]:
    """Per-speaker tracks of equal length on the job's timeline."""
    if len(tracks) == 1:
        return tracks
    first, second = tracks
    if audio_type == "add":
        return [np.pad(first, (0, len(second))), np.pad(second, (len(first), 0))]
    length = max(len(first), len(second))
    return [np.pad(t, (0, length - len(t))) for t in tracks]


def default_boxes(height: int, width: int) -> tuple[Box, Box]:
    """The official default: left and right halves, each inset by 5% of its size."""
    half = width // 2
    top, bottom = int(height * DEFAULT_MARGIN), int(height * (1 - DEFAULT_MARGIN))
    left = Box(int(half * DEFAULT_MARGIN), top, int(half * (1 - DEFAULT_MARGIN)), bottom)
    right = Box(int(half * DEFAULT_MARGIN + half), top, int(half * (1 - DEFAULT_MARGIN) + half), bottom)
    return left, right


def speaker_masks(
    boxes: tuple[Box, ...] | None, source_h: int, source_w: int, height: int, width: int, where: str
) -> torch.Tensor:
    """[3, height, width] float masks in {0, 1}: speaker 1, speaker 2, background (neither)."""
    boxes = boxes or default_boxes(source_h, source_w)
    masks = torch.zeros(3, source_h, source_w)
    for i, box in enumerate(boxes):
        box.check(source_w, source_h, f"{where} speaker {i + 1}")
        masks[i, int(box.top) : int(box.bottom), int(box.left) : int(box.right)] = 1
    masks[2] = 1 - masks[:2].amax(dim=0)
    return (media.fit_to(masks, height, width) > 0.5).float()
