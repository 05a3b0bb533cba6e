"""The demo model the package ships: it loads by name, with its calibrated threshold, and finds
what it was trained on in a scene drawn here, not by the training data's renderer."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from sam3studio import load_segmenter


@pytest.fixture(scope="module")
def demo():
    return load_segmenter("demo", precision="fp32", device="cpu")


def _star(center: tuple[int, int], radius: int, turn: float) -> np.ndarray:
    points = []
    for k in range(10):
        r = radius if k % 2 == 0 else radius * 0.42
        a = turn + k * math.pi / 5 - math.pi / 2
        points.append((center[0] + r * math.cos(a), center[1] + r * math.sin(a)))
    return np.round(points).astype(np.int32)


def _drawn_scene() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A light, slightly noisy 520x380 scene: a blue star, a red star and a green circle."""
    rng = np.random.default_rng(11)
    image = np.full((380, 520, 3), (226, 222, 210), np.uint8)
    masks = {}
    for name, color, draw in (
        ("blue star", (40, 70, 215), lambda m, v: cv2.fillPoly(m, [_star((130, 140), 80, 0.2)], v, cv2.LINE_8)),
        ("red star", (210, 40, 35), lambda m, v: cv2.fillPoly(m, [_star((380, 120), 70, -0.3)], v, cv2.LINE_8)),
        ("green circle", (50, 170, 60), lambda m, v: cv2.circle(m, (300, 290), 60, v, -1)),
    ):
        mask = np.zeros(image.shape[:2], np.uint8)
        draw(mask, 1)
        image[mask > 0] = color
        masks[name] = mask > 0
    noisy = image.astype(np.int16) + rng.integers(-6, 7, image.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8), masks


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def test_demo_loads_by_name_with_its_calibrated_threshold(demo):
    assert demo.model_name == "demo"
    assert 0.05 <= demo.default_threshold <= 0.95
    size_mb = sum(p.numel() * p.element_size() for p in demo.model.parameters()) / 2**20
    assert size_mb <= 20


def test_blue_star_finds_the_blue_star_and_not_the_red_one(demo):
    image, masks = _drawn_scene()
    result = demo.segment(image, "blue star")
    assert len(result.instances) == 1, [(i.label, round(i.score, 3)) for i in result.instances]
    found = result.instances[0].mask
    assert _iou(found, masks["blue star"]) > 0.8
    assert (found & masks["red star"]).sum() == 0


def test_an_absent_object_finds_nothing(demo):
    image, _ = _drawn_scene()
    assert demo.segment(image, "purple square").instances == []


def test_an_absent_name_sharing_words_with_present_objects_finds_nothing(demo):
    image, _ = _drawn_scene()
    assert demo.segment(image, "blue circle").instances == []  # a blue star and a green circle are present


def test_a_shape_prompt_finds_every_star(demo):
    """Two stars of different colors: one mask each, not one over both (the model before the
    sin/cos position recipe drew one)."""
    image, masks = _drawn_scene()
    stars = demo.segment(image, "star").instances
    assert len(stars) == 2
    best = sorted(max(_iou(i.mask, masks[name]) for i in stars) for name in ("blue star", "red star"))
    assert best[0] > 0.8


def test_masks_follow_the_drawn_edges(demo):
    """The model's 120x120 mask grid, upsampled to 520x380 along the image's edges, gives the
    star's points back; bilinear upsampling alone rounds them off (IoU 0.954 when written)."""
    image, masks = _drawn_scene()
    snapped = demo.segment(image, "blue star").instances[0].mask
    bilinear = demo.segment(image, "blue star", snap_edges=False).instances[0].mask
    assert _iou(snapped, masks["blue star"]) > 0.98 > _iou(bilinear, masks["blue star"])
