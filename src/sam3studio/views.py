"""Test-time views: the model also run on mirrored copies of the image, its answers merged.

Why: a small model's score for an object changes with the way the object faces, so one view's
score is a noisy reading and the mean of several is a better one. On the demo's validation
split, four views (as is, mirrored left-right, upside down, half turned) of the five-stage demo
checkpoint raised the best F1 from 0.846 to 0.879 and, at about the same share of absent
prompts answered (0.095-0.098), mIoU from 0.815 to 0.838 and recall from 0.888 to 0.906
(runs/demo-checkpoint/RESUME.md, "Test-time views"). A model states how many views it wants in
its settings file; everything else runs one.

Each view's outputs are mapped back to the image's own frame, then its queries are matched,
prompt by prompt, to the first view's by mask IoU (Hungarian). A matched query adds its score,
box and mask logits to the first view's; an unmatched one adds nothing, so a mask only one view
sees keeps a fraction of its score.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .postprocess import OptionError, mask_iou_matrix

VIEW_COUNTS = (1, 2, 4)  # identity; + left-right mirror; + upside down and half turn
SAME_MASK_IOU = 0.5  # two views' masks overlapping at least this (IoU) describe the same object


@dataclass(frozen=True)
class View:
    """A mirror of the image: along x (left-right), along y (upside down), or both (a half turn)."""

    flip_x: bool
    flip_y: bool

    @property
    def is_identity(self) -> bool:
        return not (self.flip_x or self.flip_y)

    def image(self, rgb: np.ndarray) -> np.ndarray:
        """(H, W, 3) image as this view sees it, C-contiguous (image hashing needs it)."""
        view = rgb[::-1] if self.flip_y else rgb
        return np.ascontiguousarray(view[:, ::-1] if self.flip_x else view)

    def boxes(self, boxes: tuple, width: int, height: int) -> tuple:
        """Pixel xyxy boxes of the image, in this view's frame (a mirror is its own inverse)."""
        mirrored = []
        for x0, y0, x1, y1 in boxes:
            if self.flip_x:
                x0, x1 = width - x1, width - x0
            if self.flip_y:
                y0, y1 = height - y1, height - y0
            mirrored.append((x0, y0, x1, y1))
        return tuple(mirrored)

    def back(self, boxes: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised xyxy boxes (..., 4) and mask logits (..., h, w) of this view, in the image's frame."""
        if self.flip_x:
            boxes = torch.stack([1 - boxes[..., 2], boxes[..., 1], 1 - boxes[..., 0], boxes[..., 3]], -1)
            masks = masks.flip(-1)
        if self.flip_y:
            boxes = torch.stack([boxes[..., 0], 1 - boxes[..., 3], boxes[..., 2], 1 - boxes[..., 1]], -1)
            masks = masks.flip(-2)
        return boxes, masks


def first_views(count: int) -> list[View]:
    """The first `count` views; the first is the image as it is."""
    if count not in VIEW_COUNTS:
        raise OptionError(f"Test-time views must be one of {', '.join(map(str, VIEW_COUNTS))}, not {count!r}.")
    return [View(False, False), View(True, False), View(False, True), View(True, True)][:count]


def merge_views(outputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mean of several views' (scores (P, Q), boxes (P, Q, 4), mask logits (P, Q, h, w)),
    all in the image's frame, query by query of the first view (see the module's docstring)."""
    if len(outputs) == 1:
        return outputs[0]
    scores, boxes, masks = (t.clone() for t in outputs[0])
    first = masks > 0
    for other_scores, other_boxes, other_masks in outputs[1:]:
        for prompt in range(len(scores)):
            ours, theirs = _matches(first[prompt], other_masks[prompt] > 0)
            scores[prompt, ours] += other_scores[prompt, theirs]
            boxes[prompt, ours] += other_boxes[prompt, theirs]
            masks[prompt, ours] += other_masks[prompt, theirs]
            unmatched = torch.ones(len(first[prompt]), dtype=torch.bool)
            unmatched[ours] = False
            boxes[prompt, unmatched] += outputs[0][1][prompt, unmatched]  # they keep the first view's shape
            masks[prompt, unmatched] += outputs[0][2][prompt, unmatched]
    count = len(outputs)
    return scores / count, boxes / count, masks / count


def _matches(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the pairs of queries (Q, h, w masks each) that describe the same object."""
    iou = mask_iou_matrix(ours.numpy(), theirs.numpy())
    rows, cols = linear_sum_assignment(-iou)
    same = iou[rows, cols] >= SAME_MASK_IOU
    return torch.as_tensor(rows[same]), torch.as_tensor(cols[same])
