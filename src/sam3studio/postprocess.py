"""From raw model outputs to the instances a user sees: score threshold, one mask per object,
mask threshold, refinement, cross-prompt NMS. Runs on cached `RawPrediction`s only, never on
the model.

One mask per object: the objects one prompt finds are distinct and their visible parts do not
overlap, so two of a prompt's masks describe one object when they overlap by IoU >=
SAME_OBJECT_IOU or when one lies mostly (SAME_OBJECT_COVER of its area) inside the other, and
only the better-scoring one is kept. A fully trained SAM3 rarely produces such pairs (its
training matches each object to one query); a less trained model, such as the small demo model,
gives near-copies of its best mask, fragments of it, or one mask over two objects, at scores
just below it. On the test split of the demo model shipped before the cover rule, IoU alone
left 2-8 duplicates (thresholds 0.2-0.475); with the cover rule there were none, and
precision@0.5 rose from 0.64 to 0.72 at 0.2 for 0.003-0.007 of mIoU
(runs/demo-checkpoint/RESUME.md).

Refinement levels (each includes the ones before it):
  0  raw: the model's mask logits, upsampled (along the image's edges unless snap_edges is off;
     see `edges`) and thresholded; nothing else.
  1  clean: drop specks and fill pinholes smaller than 1% of the mask's area (at least 16 px).
  2  smooth: also round off jagged edges with a morphological open and close whose radius grows
     with the image (0.4% of its diagonal, at least 1 px).
  3  solid: also keep only the largest connected piece and fill every hole in it.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import replace

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from . import edges
from .types import Instance, RawPrediction, Result

REFINE_LEVELS = {0: "raw", 1: "clean", 2: "smooth", 3: "solid"}
_MIN_SPECK_PX = 16
_UPSAMPLE_BUDGET_BYTES = 800_000_000  # float32 masks upsampled at once: 16 at 12 MP, 5 at 40 MP
_UPSAMPLE_MOST = 16
MAX_RESULT_MASK_BYTES = 2_000_000_000  # all of one result's full-size masks; see _check_result_size
SAME_OBJECT_IOU = 0.5
SAME_OBJECT_COVER = 0.6  # share of the smaller mask inside the larger


class OptionError(ValueError):
    """A post-processing option out of range."""


def check_options(threshold: float, mask_threshold: float, refine: int, nms_iou: float | None) -> None:
    """Reject bad options before any work is done."""
    for name, value, low_open in (("threshold", threshold, False), ("mask_threshold", mask_threshold, True)):
        if not isinstance(value, numbers.Real) or math.isnan(value) or not (0 < value < 1 if low_open else 0 <= value <= 1):
            bounds = "strictly between 0 and 1" if low_open else "between 0 and 1"
            raise OptionError(f"{name} must be a number {bounds}; got {value!r}.")
    if refine not in REFINE_LEVELS:
        raise OptionError(f"refine must be one of {sorted(REFINE_LEVELS)} ({', '.join(REFINE_LEVELS.values())}); got {refine!r}.")
    if nms_iou is not None and (not isinstance(nms_iou, numbers.Real) or not 0 < nms_iou <= 1):
        raise OptionError(f"nms_iou must be in (0, 1]; got {nms_iou!r}.")


def upsample_chunk(image_size: tuple[int, int]) -> int:
    """How many masks to upsample in one go for an image of this size."""
    return max(1, min(_UPSAMPLE_MOST, _UPSAMPLE_BUDGET_BYTES // (image_size[0] * image_size[1] * 4)))


def select(
    raw: RawPrediction,
    *,
    threshold: float = 0.5,
    mask_threshold: float = 0.5,
    refine: int = 0,
    nms_iou: float | None = None,
    snap_edges: bool = True,
) -> Result:
    """Keep queries scoring at least `threshold` (or their prompt's own threshold) and, of a
    prompt's masks that describe one object, the best (see the module's docstring); upsample
    their masks to the image, along its edges when `snap_edges` and the image is known (see
    `edges`), binarise them at `mask_threshold`, refine them, and optionally suppress
    duplicates: an instance whose mask overlaps a better-scoring one by IoU >= `nms_iou` is
    dropped, whatever prompt found it. Instances with empty masks are dropped.
    """
    check_options(threshold, mask_threshold, refine, nms_iou)
    started = time.perf_counter()
    instances: list[Instance] = []
    logit_cut = math.log(mask_threshold / (1 - mask_threshold))
    chunk_size = upsample_chunk(raw.image_size)
    chosen = []
    for index, prompt in enumerate(raw.prompts):
        cut = threshold if prompt.threshold is None else prompt.threshold
        kept = np.flatnonzero(raw.scores[index] >= cut)
        kept = kept[np.argsort(-raw.scores[index][kept], kind="stable")]
        small = raw.mask_logits[index][kept] > logit_cut
        # Bilinear upsampling never exceeds the largest low-resolution logit: a mask empty here is empty at full
        # size. Snapped to edges it could gain a few pixels, but a mask the model left empty stays dropped.
        nonempty = small.any((-2, -1))
        chosen.append((index, prompt, kept[nonempty][one_per_object(small[nonempty])]))
    _check_result_size(sum(kept.size for _, _, kept in chosen), raw.image_size)
    for index, prompt, kept in chosen:
        for start in range(0, kept.size, chunk_size):  # bounded memory at any threshold and image size
            chunk = kept[start : start + chunk_size]
            masks = full_size_masks(raw, raw.mask_logits[index][chunk], mask_threshold, snap_edges)
            for query, mask in zip(chunk, masks):
                mask = refine_mask(mask, refine)
                if mask.any():
                    mask = mask.copy() if mask.base is not None else mask  # a view would keep its whole chunk alive
                    instances.append(Instance(prompt.label, float(raw.scores[index, query]), mask_box(mask), mask, index))
    if nms_iou is not None:
        instances = suppress_duplicates(instances, nms_iou)
    return Result(
        instances=instances,
        image_size=raw.image_size,
        prompts=raw.prompts,
        model=raw.model,
        precision_requested=raw.precision_requested,
        precision_used=raw.precision_used,
        fallback_fp32=raw.fallback_fp32,
        timings_ms=raw.timings_ms | {"postprocess": (time.perf_counter() - started) * 1000},
    )


def _check_result_size(masks: int, image_size: tuple[int, int]) -> None:
    """Refuse, before any mask is upsampled, a result whose full-size masks (one byte a pixel)
    would take more than MAX_RESULT_MASK_BYTES: a threshold near 0 keeps every distinct query
    of every prompt, 64 x 200 of them at full size, which on a 40 MP image would be 500 GB."""
    needed = masks * image_size[0] * image_size[1]
    if needed > MAX_RESULT_MASK_BYTES:
        most = MAX_RESULT_MASK_BYTES // (image_size[0] * image_size[1])
        raise OptionError(
            f"{masks} masks pass this threshold; at {image_size[1]}x{image_size[0]} they would take {needed / 1e9:.1f} GB "
            f"(at most {most} fit in {MAX_RESULT_MASK_BYTES / 1e9:.0f} GB). Raise the threshold, or downscale the image."
        )


def with_mask_confidence(raw: RawPrediction, power: float) -> RawPrediction:
    """`raw` with each query's score multiplied by its mask's confidence to `power`, as
    Mask2Former scores its instances. A mask that fits its object is confident to its edges; a
    fragment, or one mask over two objects, is not, yet the demo model's queries score them
    alike. On its position-keeping checkpoint, power 4 raised precision@0.5 from 0.48 to 0.65
    at the same recall (runs/demo-checkpoint/RESUME.md). Power 0, what SAM3 ships with, leaves
    the scores as the model gave them."""
    if power == 0:
        return raw
    return replace(raw, scores=(raw.scores * mask_confidence(raw.mask_logits) ** power).astype(np.float32))


def mask_confidence(mask_logits: np.ndarray) -> np.ndarray:
    """(..., h, w) mask logits -> (...) the mean probability over the pixels each mask keeps
    at the default mask threshold (logit > 0); 0 for an empty mask."""
    kept = mask_logits > 0
    probability = _sigmoid(mask_logits.astype(np.float32))
    return (probability * kept).sum((-2, -1)) / np.maximum(kept.sum((-2, -1)), 1)


def one_per_object(masks: np.ndarray) -> np.ndarray:
    """Indices (in order) of masks (K, h, w), best first, that describe no object an earlier
    kept mask describes (see the module's docstring). Computed at the model's mask resolution,
    before upsampling: a (K, h*w) matrix product, about a millisecond at full size."""
    if len(masks) < 2:
        return np.arange(len(masks))
    flat = masks.reshape(len(masks), -1).astype(np.float32)
    inter = flat @ flat.T
    area = flat.sum(1)
    union = area[:, None] + area[None] - inter
    smaller = np.minimum(area[:, None], area[None])
    same = ((inter >= SAME_OBJECT_IOU * union) | (inter >= SAME_OBJECT_COVER * smaller)) & (inter > 0)
    kept: list[int] = []
    for i in range(len(masks)):
        if not same[i, kept].any():
            kept.append(i)
    return np.array(kept, dtype=np.int64)


def full_size_masks(raw: RawPrediction, logits: np.ndarray, mask_threshold: float, snap_edges: bool) -> np.ndarray:
    """(K, h, w) mask logits of `raw` -> (K, H, W) bool masks at the image's size. Snapped
    masks are upsampled one at a time: each needs its float probability while it is filtered."""
    if not snap_edges or raw.image is None:
        return upsample_masks(logits, raw.image_size) > math.log(mask_threshold / (1 - mask_threshold))
    if raw.image.shape != (*raw.image_size, 3) or raw.image.dtype != np.uint8:
        raise ValueError(f"RawPrediction.image must be ({raw.image_size[0]}, {raw.image_size[1]}, 3) uint8, the image its masks "
                         f"belong to; got {raw.image.shape} {raw.image.dtype}.")
    radius = edges.radius_for(raw.image_size, logits.shape[-2:])
    support = min(edges.SUPPORT, mask_threshold / 2)
    masks = np.empty((len(logits), *raw.image_size), dtype=bool)
    for index, mask in enumerate(logits):
        probability = _sigmoid(upsample_masks(mask[None], raw.image_size)[0])
        masks[index] = edges.snap_to_edges(probability, raw.image, radius, support=support) > mask_threshold
    return masks


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    """A new float32 array (float32 logits in): the sigmoid, without exp's overflow."""
    out = np.tanh(0.5 * logits)
    out *= 0.5
    out += 0.5
    return out


def upsample_masks(logits: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(K, h, w) low-resolution logits -> (K, H, W) logits, bilinear as transformers does."""
    tensor = torch.from_numpy(np.ascontiguousarray(logits))[None]
    return F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)[0].numpy()


def refine_mask(mask: np.ndarray, level: int) -> np.ndarray:
    """Apply refinement `level` (see the module docstring) to one (H, W) bool mask.

    The work runs on the mask's bounding box plus a margin of the background around it, cut at
    the image's edges, which gives the same answer as the whole image at a fraction of the cost
    for the usual object that covers a small part of the image: the margin connects everything
    outside the box, holds what smoothing can grow (its radius), and where the box meets the
    image's edge the window's edge is the image's, treated alike by OpenCV's morphology (a
    margin of background there made erosion eat masks from the image's edges).
    """
    if level == 0 or not mask.any():
        return mask
    radius = max(1, round(0.004 * math.hypot(*mask.shape)))
    x0, y0, x1, y1 = (int(v) for v in mask_box(mask))
    margin = 2 * radius + 2
    window = slice(max(y0 - margin, 0), min(y1 + margin, mask.shape[0])), slice(max(x0 - margin, 0), min(x1 + margin, mask.shape[1]))
    out = np.zeros_like(mask)
    out[window] = _refine_window(mask[window], level, radius, smallest=max(_MIN_SPECK_PX, int(0.01 * mask.sum())))
    return out


def _refine_window(mask: np.ndarray, level: int, radius: int, smallest: int) -> np.ndarray:
    mask = _fill_holes(_remove_small_regions(mask, smallest), max_area=smallest)
    if level >= 2:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        smoothed = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, kernel)
        smoothed = cv2.morphologyEx(smoothed, cv2.MORPH_CLOSE, kernel)
        mask = smoothed.astype(bool) if smoothed.any() else mask  # never smooth an object away
    if level >= 3:
        mask = _fill_holes(_largest_region(mask))
    return mask


def _remove_small_regions(mask: np.ndarray, min_area: int) -> np.ndarray:
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    small = np.flatnonzero(areas < min_area) + 1
    small = small[small != 1 + np.argmax(areas)] if areas.size else small  # the main piece always stays
    return mask & ~_label_table(count, small)[labels] if small.size else mask


def _largest_region(mask: np.ndarray) -> np.ndarray:
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count <= 2:
        return mask
    return labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))


def _fill_holes(mask: np.ndarray, max_area: int | None = None) -> np.ndarray:
    """Fill holes (background not reachable from the image border), all or those < max_area."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats((~mask).astype(np.uint8), connectivity=4)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    holes = np.setdiff1d(np.arange(1, count), border)
    if max_area is not None:
        holes = holes[stats[holes, cv2.CC_STAT_AREA] < max_area]
    return mask | _label_table(count, holes)[labels] if holes.size else mask


def _label_table(count: int, chosen: np.ndarray) -> np.ndarray:
    """A lookup table: table[labels] marks the chosen components, far faster than np.isin."""
    table = np.zeros(count, dtype=bool)
    table[chosen] = True
    return table


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """Tight box of a non-empty mask, xyxy in pixel edges (x1 = last column + 1)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return (float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def mask_iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) IoU of every mask of `a` (N, ...) with every mask of `b` (M, ...), as one matrix
    product; 0 where both are empty."""
    fa = a.reshape(len(a), -1).astype(np.float32)
    fb = b.reshape(len(b), -1).astype(np.float32)
    inter = fa @ fb.T
    union = fa.sum(1)[:, None] + fb.sum(1)[None] - inter
    return inter / np.maximum(union, 1)


def suppress_duplicates(instances: list[Instance], iou: float) -> list[Instance]:
    """Greedy mask NMS over all prompts; the survivors keep their original order."""
    order = sorted(range(len(instances)), key=lambda i: -instances[i].score)
    kept: list[int] = []
    for i in order:
        if all(mask_iou(instances[i].mask, instances[k].mask) < iou for k in kept):
            kept.append(i)
    return [instances[i] for i in sorted(kept)]
