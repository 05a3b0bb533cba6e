import numpy as np
import pytest

from sam3studio.evaluate import MIN_PRECISION, EvalCase, PromptAnswers, _best_threshold, best_queries, calibrate_scoring, queries_to_keep, calibrate_threshold, collect, score
from sam3studio.postprocess import select
from sam3studio.types import Prompt, RawPrediction


def _logits(box, size=(20, 20)):
    logits = np.full(size, -10.0, np.float32)
    x0, y0, x1, y1 = box
    logits[y0:y1, x0:x1] = 10.0
    return logits


def _mask(box, size=(20, 20)):
    return _logits(box, size) > 0


def _case():
    """Prompt "a": two objects; the first found twice, by its top 70% and its bottom 70% (IoU 0.7
    with it, 0.4 with each other: too little to be dropped as one mask), the second exactly but
    at a low score; prompt "b": absent (negative) but the model answers with a score of 0.4."""
    scores = np.array([[0.9, 0.8, 0.2], [0.4, 0.1, 0.1]], np.float32)
    masks = np.stack([
        [_logits((0, 0, 10, 7)), _logits((0, 3, 10, 10)), _logits((12, 12, 20, 20))],
        [_logits((5, 5, 15, 15)), _logits((0, 0, 1, 1)), _logits((0, 0, 1, 1))],
    ])
    raw = RawPrediction((20, 20), [Prompt("a"), Prompt("b")], scores, np.zeros((2, 3, 4), np.float32), masks, "t", "fp32", "fp32")
    truth = {"a": np.stack([_mask((0, 0, 10, 10)), _mask((12, 12, 20, 20))])}
    return EvalCase(raw, truth, ["b"])


def test_scores_known_answers():
    report = score([_case()], threshold=0.5)
    # object 1 matched with IoU 0.7, object 2 missed (its query scores 0.2) -> mIoU 0.35
    assert report.miou == pytest.approx(0.35) and report.recall_at_50 == 0.5
    assert report.precision_at_50 == 0.5  # two predictions, one true
    assert report.duplicates == 1  # the second find of object 1
    assert report.negative_fp_rate == 0.0  # "b" scored 0.4 < 0.5
    low = score([_case()], threshold=0.15)
    assert low.miou == pytest.approx(0.85) and low.recall_at_50 == 1.0 and low.negative_fp_rate == 1.0


def test_every_threshold_counts_what_select_returns_at_it():
    # Absent prompt "b": a mask at 0.6, a copy of it at 0.5 (the same object: select keeps the
    # better one), a distinct mask at 0.3 and an empty one at 0.35. Scored once for all thresholds.
    first, copy, other = _logits((2, 2, 12, 12)), _logits((2, 2, 12, 11)), _logits((14, 14, 19, 19))
    empty = np.full((20, 20), -10.0, np.float32)
    raw = RawPrediction((20, 20), [Prompt("b")], np.array([[0.5, 0.3, 0.6, 0.35]], np.float32), np.zeros((1, 4, 4), np.float32),
                        np.stack([[copy, other, first, empty]]), "t", "fp32", "fp32")
    case = EvalCase(raw, {}, ["b"])
    for threshold in (0.2, 0.32, 0.4, 0.55, 0.7):
        assert score([case], threshold).negative_predictions == len(select(raw, threshold=threshold).instances) == (
            2 if threshold < 0.3 else 1 if threshold <= 0.6 else 0)


def test_calibration_takes_the_lowest_threshold_within_both_limits():
    # Prompt "a" (see _case): at 0.85 one right answer (precision 1, mIoU 0.35); at 0.5 its
    # duplicate joins (precision 0.5, mIoU the same); at 0.15 the second object too (precision
    # 2/3, mIoU 0.85). Absent "b" answers at 0.3 and below.
    candidates = np.array([0.15, 0.3, 0.5, 0.85])
    assert calibrate_threshold([_case()], candidates) == 0.85
    assert calibrate_threshold([_case()], candidates, min_precision=0.5) == 0.5, "as good as 0.85, and lower"
    assert calibrate_threshold([_case()], candidates, max_negative_fp=1.0, min_precision=0.6) == 0.15, "finds both objects"
    assert calibrate_threshold([_case()], candidates[:2]) == 0.15, "neither keeps 'b' quiet: the more precise"


def _hundred_objects(extra_wrong: int) -> dict:
    """One prompt, 100 objects: 99 found at score 0.9, the last at 0.4 beside `extra_wrong`
    wrong masks at 0.4."""
    found = 100 + extra_wrong
    ious = np.zeros((100, found), np.float32)
    ious[np.arange(100), np.arange(100)] = 1.0
    scores = np.array([0.9] * 99 + [0.4] * (1 + extra_wrong), np.float32)
    return {"a": PromptAnswers(scores, ious)}


def test_calibration_lets_wrong_answers_in_only_down_to_the_precision_floor():
    # At 0.3 the last object is found beside the wrong masks: precision 100/120 keeps the floor
    # of 0.8, 100/130 does not.
    assert 100 / 130 < MIN_PRECISION <= 100 / 120
    candidates = np.array([0.3, 0.5])
    assert _best_threshold([_hundred_objects(20)], candidates, 0.1, MIN_PRECISION)[0] == 0.3
    assert _best_threshold([_hundred_objects(30)], candidates, 0.1, MIN_PRECISION)[0] == 0.5


def test_scoring_calibration_takes_the_mask_confidence_when_it_ranks_better():
    # Prompt "a": its object found by a sure mask at 0.6 and, scoring higher, a hesitant mask
    # (probability 0.55 inside) over 40% of it and 60% beside it, too little to count as the
    # object or to be dropped as its copy. By score alone no threshold keeps the object without
    # the wrong mask (precision 1/2, below the floor); times the confidence it falls to 0.495
    # (0.27 squared) and a threshold between it and 0.6 keeps the object alone (precision 1).
    sure = _logits((0, 0, 10, 10))
    hesitant = np.where(_logits((0, 6, 10, 16)) > 0, np.log(0.55 / 0.45), -10.0).astype(np.float32)
    raw = RawPrediction((20, 20), [Prompt("a")], np.array([[0.9, 0.6]], np.float32), np.zeros((1, 2, 4), np.float32),
                        np.stack([[hesitant, sure]]), "t", "fp32", "fp32")
    case = EvalCase(raw, {"a": _mask((0, 0, 10, 10))[None]}, [])
    power, threshold = calibrate_scoring([case])
    assert power > 0 and 0.9 * 0.55**power < threshold <= 0.6
    assert calibrate_scoring([_case()]) == (0.0, calibrate_threshold([_case()])), "sure masks alike: a tie keeps the scores as they are"


def test_collect_runs_the_model_on_a_dataset(tmp_path, segmenter):
    from sam3studio.train.data import CocoSegmentationData
    from sam3studio.train.shapes import SceneConfig, write_dataset

    data = CocoSegmentationData(write_dataset(tmp_path / "d", 3, seed=5, config=SceneConfig(min_side=64, max_side=96)))
    cases, seconds = collect(segmenter, data, precision="fp32", negatives_per_image=2)
    assert len(cases) == 3 and seconds > 0
    again, _ = collect(segmenter, data, precision="fp32", negatives_per_image=2)
    assert [c.negatives for c in cases] == [c.negatives for c in again], "the same negatives for every mode"
    report = score(cases, 0.0)
    assert 0.0 <= report.miou <= 1.0 and report.instances == sum(len(m) for c in cases for m in c.truth.values())


def test_an_image_with_more_names_than_one_call_takes_is_run_in_several(tmp_path, segmenter, monkeypatch):
    from sam3studio import evaluate
    from sam3studio.train.data import CocoSegmentationData
    from sam3studio.train.shapes import SceneConfig, write_dataset

    data = CocoSegmentationData(write_dataset(tmp_path / "d", 1, seed=5, config=SceneConfig(min_side=64, max_side=96)))
    [whole], _ = collect(segmenter, data, precision="fp32", negatives_per_image=6)
    monkeypatch.setattr(evaluate, "MAX_PROMPTS", 3)
    [pieces], _ = collect(segmenter, data, precision="fp32", negatives_per_image=6)
    assert len(pieces.raw.prompts) > 3 and pieces.raw.prompts == whole.raw.prompts
    np.testing.assert_allclose(pieces.raw.scores, whole.raw.scores, atol=1e-5)


def test_best_queries_keeps_the_top_scores_of_each_prompt_with_their_masks():
    rng = np.random.default_rng(0)
    scores = rng.random((2, 10)).astype(np.float32)
    masks = np.arange(2 * 10, dtype=np.float32).reshape(2, 10, 1, 1) * np.ones((1, 1, 4, 4), np.float32)
    raw = RawPrediction((8, 8), [Prompt("a"), Prompt("b")], scores, rng.random((2, 10, 4)).astype(np.float32), masks, "m", "fp32", "fp32")
    slim = best_queries(raw, 3)
    for p in range(2):
        top = np.argsort(-scores[p])[:3]
        assert np.array_equal(slim.scores[p], scores[p, top])
        assert np.array_equal(slim.mask_logits[p, :, 0, 0], masks[p, top, 0, 0])
        assert np.array_equal(slim.boxes[p], raw.boxes[p, top])
    assert best_queries(raw, 10) is raw


def test_crowded_images_keep_enough_queries_to_find_every_object():
    assert queries_to_keep({"a": np.zeros((3, 4, 4), bool)}) == 32
    assert queries_to_keep({"a": np.zeros((3, 4, 4), bool), "person": np.zeros((40, 4, 4), bool)}) == 80
    assert queries_to_keep({}) == 32


def test_answers_inside_a_crowd_region_are_neither_right_nor_wrong():
    # Prompt "a": one object at the top left, and a crowd of "a" annotated as one region at the
    # bottom right. Answers: the object (0.9), a mask inside the crowd (0.8), a mask on the
    # background (0.7). Only the background one is a false positive, as in COCO's evaluator.
    scores = np.array([[0.9, 0.8, 0.7]], np.float32)
    masks = np.stack([[_logits((0, 0, 6, 6)), _logits((12, 12, 17, 17)), _logits((0, 14, 5, 19))]])
    raw = RawPrediction((20, 20), [Prompt("a")], scores, np.zeros((1, 3, 4), np.float32), masks, "t", "fp32", "fp32")
    truth = {"a": _mask((0, 0, 6, 6))[None]}
    plain = score([EvalCase(raw, truth, [])], 0.5)
    crowded = score([EvalCase(raw, truth, [], {"a": _mask((10, 10, 20, 20))})], 0.5)
    assert plain.precision_at_50 == pytest.approx(1 / 3) and crowded.precision_at_50 == pytest.approx(1 / 2)
    assert crowded.recall_at_50 == plain.recall_at_50 == 1.0 and crowded.miou == plain.miou == 1.0
    # An object inside the crowd region is still matched by its answer, not ignored.
    inside = {"a": np.stack([_mask((0, 0, 6, 6)), _mask((12, 12, 17, 17))])}
    assert score([EvalCase(raw, inside, [], {"a": _mask((10, 10, 20, 20))})], 0.5).recall_at_50 == 1.0


def test_collect_reads_crowd_regions_from_the_dataset(tmp_path, segmenter):
    import json

    from sam3studio.train.data import CocoSegmentationData
    from sam3studio.train.shapes import SceneConfig, write_dataset

    folder = write_dataset(tmp_path / "d", 1, seed=5, config=SceneConfig(min_side=64, max_side=96))
    document = json.loads((folder / "annotations.json").read_text())
    document["annotations"][0]["iscrowd"] = 1
    (folder / "annotations.json").write_text(json.dumps(document))
    data = CocoSegmentationData(folder)
    name = data.categories[document["annotations"][0]["category_id"]]["name"]
    [case], _ = collect(segmenter, data, precision="fp32")
    assert set(case.crowds) >= {name} and case.crowds[name].shape == (document["images"][0]["height"], document["images"][0]["width"])
    assert case.crowds[name].any() and name not in case.negatives
