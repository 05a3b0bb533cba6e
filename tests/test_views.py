"""Test-time views: mirrors map boxes and masks exactly, views merge query by query, and the
Segmenter's merged answer is the mean of the views it ran."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from sam3studio import ModelLoadError, load_segmenter
from sam3studio.loading import load_model
from sam3studio.postprocess import OptionError
from sam3studio.views import View, first_views, merge_views

MIRRORS = first_views(4)[1:]


@pytest.mark.parametrize("view", MIRRORS, ids=["left-right", "upside-down", "half-turn"])
def test_a_mirrored_box_covers_the_mirrored_object(view):
    image = np.zeros((30, 50, 3), np.uint8)
    image[4:12, 7:20] = 255  # rows 4-11, columns 7-19: the box (7, 4, 20, 12) in pixel-edge xyxy
    seen = view.image(image)[..., 0] > 0
    (x0, y0, x1, y1), = view.boxes(((7, 4, 20, 12),), width=50, height=30)
    expected = np.zeros_like(seen)
    expected[y0:y1, x0:x1] = True
    assert seen.flags.c_contiguous
    assert (seen == expected).all()


@pytest.mark.parametrize("view", MIRRORS, ids=["left-right", "upside-down", "half-turn"])
def test_back_undoes_the_view_on_masks_and_boxes(view):
    mask = np.zeros((12, 20), np.float32)
    mask[2:5, 3:11] = 1.0
    in_view = torch.from_numpy(view.image(mask[..., None])[..., 0].copy())[None, None]
    (x0, y0, x1, y1), = view.boxes(((3, 2, 11, 5),), width=20, height=12)
    box_in_view = torch.tensor([[[x0 / 20, y0 / 12, x1 / 20, y1 / 12]]])
    boxes, masks = view.back(box_in_view, in_view)
    assert torch.equal(masks[0, 0], torch.from_numpy(mask))
    assert torch.allclose(boxes[0, 0], torch.tensor([3 / 20, 2 / 12, 11 / 20, 5 / 12]))


def _square_logits(*corners: tuple[int, int], size: int = 4) -> torch.Tensor:
    """(1, Q, 16, 16) mask logits, +5 on a size x size square at each (row, column), -5 elsewhere."""
    logits = torch.full((1, len(corners), 16, 16), -5.0)
    for q, (r, c) in enumerate(corners):
        logits[0, q, r : r + size, c : c + size] = 5.0
    return logits


def test_merge_averages_matched_queries_and_counts_a_miss_as_zero():
    first = (torch.tensor([[0.8, 0.6]]), torch.tensor([[[0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 0.9, 0.9]]]), _square_logits((0, 0), (8, 8)))
    # The second view sees the first object as its second query, one pixel to the right (IoU
    # 12/20), and in place of the other object something that overlaps nothing.
    second = (torch.tensor([[0.2, 0.4]]), torch.tensor([[[0.0, 0.0, 0.2, 0.2], [0.2, 0.1, 0.4, 0.3]]]), _square_logits((12, 0), (0, 1)))
    scores, boxes, masks = merge_views([first, second])
    assert torch.allclose(scores, torch.tensor([[0.6, 0.3]]))  # (0.8 + 0.4) / 2; (0.6 + 0) / 2
    assert torch.allclose(boxes[0, 0], torch.tensor([0.15, 0.1, 0.35, 0.3]))
    assert torch.equal(boxes[0, 1], first[1][0, 1]) and torch.equal(masks[0, 1], first[2][0, 1])
    assert torch.equal(masks[0, 0], (first[2][0, 0] + second[2][0, 1]) / 2)


def test_one_view_is_returned_as_it_is():
    only = (torch.rand(2, 3), torch.rand(2, 3, 4), torch.randn(2, 3, 8, 8))
    assert merge_views([only]) is only


def test_the_segmenter_runs_each_view_on_the_mirrored_image_and_boxes(tiny_checkpoint, scene, monkeypatch):
    """What views=2 merges is a plain run on the image and one on its mirror (box exemplars
    mirrored with it), mapped back to the image's frame."""
    import sam3studio.segmenter as segmenter_module

    merged_inputs = []
    monkeypatch.setattr(segmenter_module, "merge_views", lambda outputs: merged_inputs.append(outputs) or merge_views(outputs))
    plain = load_segmenter(str(tiny_checkpoint), precision="fp32", device="cpu", views=1)
    twice = load_segmenter(str(tiny_checkpoint), precision="fp32", device="cpu", views=2)
    height, width = scene.shape[:2]
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    mirror = View(True, False)
    for prompts, boxes in (("red square, blue circle", None), ("red square", [(15, 10, 60, 50)])):
        merged_inputs.clear()
        twice.predict(scene, prompts, boxes=boxes)
        (as_is, mirrored), = [outputs for outputs in merged_inputs if len(outputs) == 2]
        expected_as_is = plain.predict(scene, prompts, boxes=boxes)
        expected_mirror = plain.predict(mirror.image(scene), prompts, boxes=mirror.boxes(boxes, width, height) if boxes else None)
        back_boxes, back_masks = mirror.back(torch.tensor(expected_mirror.boxes) / scale, torch.tensor(expected_mirror.mask_logits))
        for got, want in zip(as_is, (expected_as_is.scores, expected_as_is.boxes / scale.numpy(), expected_as_is.mask_logits)):
            assert np.allclose(got.numpy(), want, atol=1e-5)
        for got, want in zip(mirrored, (torch.tensor(expected_mirror.scores), back_boxes, back_masks)):
            assert torch.allclose(got, want, atol=1e-5)
    assert twice.counters["image_encodings"] == 2


def test_view_counts_are_checked_when_loading(tiny_checkpoint, tmp_path):
    with pytest.raises(OptionError, match="1, 2, 4"):
        load_segmenter(str(tiny_checkpoint), precision="fp32", device="cpu", views=3)
    folder = tmp_path / "viewed"
    shutil.copytree(tiny_checkpoint, folder)
    (folder / "sam3studio.json").write_text(json.dumps({"score_threshold": 0.3, "test_time_views": 4}))
    assert load_model(str(folder)).test_time_views == 4
    assert len(load_segmenter(str(folder), precision="fp32", device="cpu").views) == 4
    assert len(load_segmenter(str(folder), precision="fp32", device="cpu", views=1).views) == 1
    assert load_model(str(tiny_checkpoint)).test_time_views == 1
    for bad in (3, 0, "4", True, 4.0):
        (folder / "sam3studio.json").write_text(json.dumps({"score_threshold": 0.3, "test_time_views": bad}))
        with pytest.raises(ModelLoadError, match="test_time_views"):
            load_model(str(folder))
