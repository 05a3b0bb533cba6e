import time

import numpy as np
import pytest

from sam3studio.postprocess import OptionError, check_options, mask_box, mask_confidence, refine_mask, select, suppress_duplicates, with_mask_confidence
from sam3studio.types import Instance, Prompt, RawPrediction


def _raw(scores, logits, prompts=("a",), size=(40, 60)):
    scores = np.asarray(scores, dtype=np.float32)
    return RawPrediction(
        image_size=size,
        prompts=[Prompt(p) for p in prompts],
        scores=scores,
        boxes=np.zeros((*scores.shape, 4), np.float32),
        mask_logits=np.asarray(logits, dtype=np.float32),
        model="test",
        precision_requested="fp32",
        precision_used="fp32",
    )


def _square(size=(40, 60), box=(10, 5, 30, 25)):
    logits = np.full(size, -10.0, dtype=np.float32)
    x0, y0, x1, y1 = box
    logits[y0:y1, x0:x1] = 10.0
    return logits


def test_select_keeps_scores_above_threshold_in_score_order():
    raw = _raw([[0.2, 0.9, 0.6]], [[_square(), _square(box=(0, 0, 10, 10)), _square(box=(40, 20, 60, 40))]])
    result = select(raw, threshold=0.5)
    assert [round(i.score, 2) for i in result.instances] == [0.9, 0.6]
    assert result.instances[0].box == (0.0, 0.0, 10.0, 10.0)
    assert result.instances[0].area == 100


def test_mask_threshold_and_upsampling_to_image_size():
    low_res = np.full((1, 1, 4, 6), -10.0, dtype=np.float32)
    low_res[0, 0, :2, :3] = 10.0
    result = select(_raw([[0.9]], low_res), threshold=0.5)
    mask = result.instances[0].mask
    assert mask.shape == (40, 60)
    assert mask[:18, :28].all() and not mask[22:, 32:].any()  # top-left quarter, bilinear edge


def test_mask_confidence_ranks_a_sure_mask_above_a_hesitant_one():
    sure = _square()  # logits +10 inside: probability ~1 on every kept pixel
    hesitant = np.where(sure > 0, np.log(0.6 / 0.4), -10.0).astype(np.float32)  # probability 0.6 inside
    empty = np.full((40, 60), -3.0, np.float32)
    confidence = mask_confidence(np.stack([[sure, hesitant, empty]]))
    assert confidence.shape == (1, 3)
    assert confidence[0] == pytest.approx([1.0, 0.6, 0.0], abs=1e-4)
    raw = _raw([[0.5, 0.8, 0.9]], [[sure, hesitant, empty]])
    assert with_mask_confidence(raw, 0.0) is raw, "power 0 leaves the model's scores alone"
    rescored = with_mask_confidence(raw, 2.0)
    assert rescored.scores[0] == pytest.approx([0.5, 0.8 * 0.36, 0.0], abs=1e-4)
    assert rescored.scores.dtype == np.float32 and raw.scores[0, 1] == pytest.approx(0.8)


def test_empty_masks_are_dropped():
    assert select(_raw([[0.9]], [[np.full((40, 60), -5.0)]]), threshold=0.1).instances == []


@pytest.mark.parametrize(
    "kwargs", [{"threshold": -0.1}, {"threshold": float("nan")}, {"mask_threshold": 0.0}, {"mask_threshold": 1.0}, {"refine": 4}, {"nms_iou": 0.0}]
)
def test_bad_options(kwargs):
    options = {"threshold": 0.5, "mask_threshold": 0.5, "refine": 0, "nms_iou": None} | kwargs
    with pytest.raises(OptionError):
        check_options(**options)


def test_refinement_levels():
    mask = np.zeros((100, 100), dtype=bool)
    mask[20:80, 20:80] = True
    mask[50, 50] = False  # a pinhole
    mask[5, 5] = True  # a speck
    mask[20:80, 90:95] = True  # a second real piece (300 px)
    assert np.array_equal(refine_mask(mask, 0), mask)
    clean = refine_mask(mask, 1)
    assert clean[50, 50] and not clean[5, 5] and clean[50, 92]
    smooth = refine_mask(mask, 2)
    assert smooth.sum() > 3000
    solid = refine_mask(mask, 3)
    assert solid[50, 50] and not solid[50, 92], "level 3 keeps only the largest piece"


def test_refinement_on_the_window_matches_the_whole_image_even_at_its_edges():
    import math

    import cv2

    from sam3studio.postprocess import _MIN_SPECK_PX, _refine_window

    rng = np.random.default_rng(0)
    for _ in range(60):
        height, width = (int(v) for v in rng.integers(20, 160, 2))
        mask = np.zeros((height, width), np.uint8)
        for _ in range(3):  # disks, some cut by the image's edges
            cv2.circle(mask, (int(rng.integers(-20, width + 20)), int(rng.integers(-20, height + 20))), int(rng.integers(2, 40)), 1, -1)
        mask = mask.astype(bool) ^ (rng.random((height, width)) < 0.03)
        radius = max(1, round(0.004 * math.hypot(height, width)))
        for level in (1, 2, 3):
            whole = _refine_window(mask, level, radius, smallest=max(_MIN_SPECK_PX, int(0.01 * mask.sum())))
            assert np.array_equal(refine_mask(mask, level), whole)
    corner = np.zeros((500, 500), bool)
    corner[300:, :200] = True
    assert refine_mask(corner, 2)[499, 0], "a mask at the image's corner keeps it"


def test_refinement_never_erases_a_small_object():
    mask = np.zeros((200, 200), dtype=bool)
    mask[100:102, 100:102] = True
    for level in (1, 2, 3):
        assert refine_mask(mask, level).any()


def test_nms_keeps_the_best_label_across_prompts():
    same = _square()
    raw = _raw([[0.7], [0.9]], [[same], [same]], prompts=("cat", "kitten"))
    assert len(select(raw, threshold=0.5).instances) == 2
    result = select(raw, threshold=0.5, nms_iou=0.5)
    assert [i.label for i in result.instances] == ["kitten"]


def test_one_prompt_gives_one_mask_per_object():
    """Near-copies of a mask from other queries of the same prompt are dropped, the best kept;
    a distinct object of that prompt, and the same mask under another prompt, stay."""
    copy = _square(box=(10, 5, 29, 25))  # IoU 0.95 with _square()
    other = _square(box=(40, 20, 60, 40))
    raw = _raw([[0.6, 0.8, 0.7], [0.9, 0.1, 0.1]], [[_square(), copy, other], [_square(), other, other]], prompts=("a", "b"))
    kept = [(i.label, round(i.score, 2)) for i in select(raw, threshold=0.5).instances]
    assert kept == [("a", 0.8), ("a", 0.7), ("b", 0.9)]


def test_a_fragment_or_a_mask_over_two_objects_is_not_a_second_object():
    """A mask lying mostly inside a better one (a fragment of it, IoU 0.2), or one spread over
    it and a neighbour, describes an object already found; a mask that only touches it does not."""
    fragment = _square(box=(10, 5, 20, 13))  # 80 px, all inside the 400 px square
    spread = _square(box=(10, 5, 52, 25))  # the square and the space beside it: IoU 0.48
    touching = _square(box=(28, 5, 48, 25))  # 40 of its 400 px inside the square
    raw = _raw([[0.9, 0.8, 0.7, 0.6]], [[_square(), fragment, spread, touching]])
    assert [round(i.score, 2) for i in select(raw, threshold=0.5).instances] == [0.9, 0.6]


def test_suppress_duplicates_keeps_distinct_objects():
    a, b = np.zeros((10, 10), bool), np.zeros((10, 10), bool)
    a[:5], b[5:] = True, True
    instances = [Instance("x", 0.5, mask_box(a), a, 0), Instance("y", 0.9, mask_box(b), b, 1)]
    assert suppress_duplicates(instances, 0.5) == instances


def test_threshold_change_on_cached_outputs_is_fast():
    """Not a timing gate (the benchmark reports figures); guards against accidental O(model) work."""
    rng = np.random.default_rng(0)
    raw = _raw(rng.random((10, 200)), rng.normal(size=(10, 200, 72, 72)), prompts=[f"p{i}" for i in range(10)], size=(480, 640))
    select(raw, threshold=0.99)
    start = time.perf_counter()
    select(raw, threshold=0.97, refine=1)
    assert time.perf_counter() - start < 5.0


def test_fewer_masks_are_upsampled_at_once_on_huge_images():
    from sam3studio.postprocess import upsample_chunk

    assert upsample_chunk((480, 640)) == 16
    assert upsample_chunk((4000, 10000)) == 5, "40 MP, the server's limit: 5 x 160 MB of float32"
    assert upsample_chunk((20000, 20000)) == 1


def test_kept_masks_own_their_memory_and_empty_ones_are_never_upsampled(monkeypatch):
    from sam3studio import postprocess

    logits = np.full((1, 6, 10, 15), -5.0, np.float32)
    for query in range(3):
        logits[0, query, 1 + 3 * query : 3 + 3 * query, 2:6] = 5.0  # three separate objects; three empty masks
    upsampled = []
    real = postprocess.upsample_masks
    monkeypatch.setattr(postprocess, "upsample_masks", lambda small, size: upsampled.append(len(small)) or real(small, size))
    result = select(_raw([[0.9, 0.8, 0.7, 0.6, 0.6, 0.6]], logits), threshold=0.0)
    assert len(result.instances) == 3 and sum(upsampled) == 3
    assert all(inst.mask.base is None for inst in result.instances), "a view keeps its whole upsampled chunk alive"


def test_a_result_too_large_to_hold_is_refused_before_upsampling(monkeypatch):
    from sam3studio import postprocess

    logits = np.full((2, 4, 10, 15), -5.0, np.float32)
    for query in range(4):
        logits[:, query, 2 * query : 2 * query + 2, :] = 5.0
    raw = _raw(np.full((2, 4), 0.9), logits, prompts=("a", "b"), size=(4000, 6000))
    monkeypatch.setattr(postprocess, "MAX_RESULT_MASK_BYTES", 7 * 4000 * 6000)
    with pytest.raises(OptionError, match="8 masks pass this threshold.*Raise the threshold"):
        select(raw, threshold=0.5)
