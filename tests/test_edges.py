"""Masks upsampled along the image's edges (sam3studio.edges, postprocess.select's snap_edges)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from sam3studio import edges
from sam3studio.postprocess import mask_iou, select
from sam3studio.types import Prompt, RawPrediction

SIZE = (240, 320)  # (H, W): 8x the 30x40 mask grid, as a 640 px image is ~5x the demo model's


def _scene(corners=((110, 160), (150, 70), (200, 150))) -> tuple[np.ndarray, np.ndarray]:
    """A small orange triangle on a noisy grey-green background, and its exact mask. The image is
    read-only, as the ones predictions keep are."""
    rng = np.random.default_rng(3)
    image = np.clip(rng.normal((120, 140, 110), 6, (*SIZE, 3)), 0, 255).astype(np.uint8)
    truth = np.zeros(SIZE, np.uint8)
    cv2.fillPoly(truth, [np.array(corners, np.int32)], 1)
    image[truth > 0] = (235, 140, 30)
    image.flags.writeable = False
    return image, truth > 0


def _coarse_raw(truth: np.ndarray, image: np.ndarray | None) -> RawPrediction:
    """The mask a model would give on an 8x coarser grid: each cell's share of the object,
    blurred over about a cell as a model's logits are, as logits."""
    share = cv2.resize(truth.astype(np.float32), (SIZE[1] // 8, SIZE[0] // 8), interpolation=cv2.INTER_AREA)
    share = np.clip(cv2.GaussianBlur(share, (0, 0), 1.0), 1e-3, 1 - 1e-3)
    logits = 4 * (np.log(share / (1 - share)) + 0.5)
    return RawPrediction(SIZE, [Prompt("triangle")], np.array([[0.9]], np.float32), np.zeros((1, 1, 4), np.float32),
                         logits[None, None].astype(np.float32), "test", "fp32", "fp32", image=image)


def test_snapping_puts_the_corners_back_that_bilinear_upsampling_rounds_off():
    image, truth = _scene()
    bilinear = select(_coarse_raw(truth, image), threshold=0.5, snap_edges=False).instances[0].mask
    snapped = select(_coarse_raw(truth, image), threshold=0.5).instances[0].mask
    without_image = select(_coarse_raw(truth, None), threshold=0.5).instances[0].mask
    assert np.array_equal(without_image, bilinear), "no image: nothing to snap to"
    assert mask_iou(bilinear, truth) < 0.97
    assert mask_iou(snapped, truth) > 0.985
    assert mask_iou(snapped, truth) > mask_iou(bilinear, truth) + 0.015


def test_a_large_window_is_filtered_at_a_smaller_size_with_nearly_the_same_mask(monkeypatch):
    image, truth = _scene()
    full = select(_coarse_raw(truth, image), threshold=0.5).instances[0].mask
    sizes = []
    coefficients = edges._coefficients
    monkeypatch.setattr(edges, "_coefficients", lambda guide, p, radius: sizes.append(p.size) or coefficients(guide, p, radius))
    monkeypatch.setattr(edges, "WORK_PIXELS", 4_000)
    shrunk = select(_coarse_raw(truth, image), threshold=0.5).instances[0].mask
    assert sizes and sizes[0] <= 4_000 < (full.any(1).sum() + 1) * (full.any(0).sum() + 1), "filtered at the smaller size"
    assert mask_iou(shrunk, full) > 0.97 and mask_iou(shrunk, truth) > 0.95


def test_flat_colour_only_smooths_and_far_pixels_stay_as_they_were():
    flat = np.full((*SIZE, 3), 128, np.uint8)
    probability = np.zeros(SIZE, np.float32)
    probability[100:140, 100:160] = 1.0
    probability[0, 0] = 0.005  # below the support: outside every window
    snapped = edges.snap_to_edges(probability, flat, radius=4)
    assert snapped[0, 0] == np.float32(0.005)
    assert mask_iou(snapped > 0.5, probability > 0.5) > 0.95
    assert snapped.dtype == np.float32 and snapped.shape == SIZE


def test_the_radius_is_counted_in_mask_cells():
    assert edges.radius_for((240, 320), (30, 40)) == 8 * edges.RADIUS_CELLS
    assert edges.radius_for((10, 10), (120, 120)) == 1


def test_a_mask_cut_by_the_image_border_and_a_grey_image():
    image, truth = _scene(corners=((-40, 200), (60, 0), (150, 239)))  # a triangle running off two sides
    grey = np.repeat(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)  # its covariance is singular but for eps
    for guide in (image, grey):
        bilinear = select(_coarse_raw(truth, guide), threshold=0.5, snap_edges=False).instances[0].mask
        snapped = select(_coarse_raw(truth, guide), threshold=0.5).instances[0].mask
        assert mask_iou(snapped, truth) > max(0.96, mask_iou(bilinear, truth) + 0.04)  # 0.977 / 0.972 against 0.923 when written


def test_an_image_that_does_not_fit_the_masks_is_a_clear_error():
    image, truth = _scene()
    with pytest.raises(ValueError, match="must be \\(240, 320, 3\\) uint8"):
        select(_coarse_raw(truth, image[:100]), threshold=0.5)
