"""Mask quality of a model on a COCO dataset, per precision mode: the numbers behind
`sam3studio eval` and the benchmark's quality column.

Each image is run once per mode with every name present in it (category and supercategory)
plus a few absent names (negatives, the same ones for every mode). The raw outputs are kept, so
any threshold can be scored, and a model's default threshold calibrated, without rerunning it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
from scipy.optimize import linear_sum_assignment

from .postprocess import mask_iou_matrix, select, with_mask_confidence
from .prompts import MAX_PROMPTS
from .segmenter import Segmenter
from .train.data import CocoSegmentationData
from .types import Prompt, RawPrediction


@dataclass
class EvalCase:
    raw: RawPrediction
    truth: dict[str, np.ndarray]  # prompt name -> (N, H, W) masks
    negatives: list[str]
    crowds: dict[str, np.ndarray] = field(default_factory=dict)  # prompt name -> (H, W) crowd region


@dataclass
class EvalReport:
    precision: str
    threshold: float
    miou: float  # mean over ground-truth instances of the IoU of their matched mask (0 if none)
    precision_at_50: float  # matched predictions with IoU >= 0.5 / all predictions on positive prompts
    recall_at_50: float
    negative_fp_rate: float  # negative prompts that returned anything / all negative prompts
    negative_predictions: int  # masks returned for negative prompts
    duplicates: int  # extra predictions overlapping an already-found object (IoU >= 0.5)
    images: int
    instances: int
    seconds: float

    def as_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def collect(seg: Segmenter, data: CocoSegmentationData, *, precision: str, negatives_per_image: int = 2, seed: int = 0, limit: int | None = None) -> tuple[list[EvalCase], float]:
    """Run the model once per image; returns the cases and the seconds spent."""
    cases = []
    started = time.perf_counter()
    for index in range(len(data) if limit is None else min(len(data), limit)):
        truth = data.ground_truth(index)
        absent = data.absent_names(index)
        rng = np.random.default_rng([seed, index])
        negatives = rng.choice(absent, size=min(negatives_per_image, len(absent)), replace=False).tolist() if absent else []
        # Prompt objects: names reach the model exactly as written (no comma or ":0.5" parsing).
        raw = _predict(seg, data.image_path(index), [Prompt(name) for name in [*truth, *negatives]], precision)
        data.check_decoded_size(index, raw.image_size)
        cases.append(EvalCase(best_queries(raw, queries_to_keep(truth)), truth, negatives, data.crowd_regions(index)))
    return cases, time.perf_counter() - started


# Queries kept per prompt for scoring, at least (see queries_to_keep): full-size SAM3's 200
# queries of 288x288 mask logits would take 66 MB per prompt and image to keep.
KEPT_QUERIES = 32


def _predict(seg: Segmenter, image, prompts: list[Prompt], precision: str) -> RawPrediction:
    """`seg.predict`, in calls of at most MAX_PROMPTS prompts (an image of a large vocabulary
    can have more names than one call takes); the image is encoded once all the same."""
    parts = [seg.predict(image, prompts[i : i + MAX_PROMPTS], precision=precision) for i in range(0, len(prompts), MAX_PROMPTS)]
    if len(parts) == 1:
        return parts[0]
    return replace(parts[0], prompts=[p for part in parts for p in part.prompts], scores=np.concatenate([p.scores for p in parts]),
                   boxes=np.concatenate([p.boxes for p in parts]), mask_logits=np.concatenate([p.mask_logits for p in parts]))


def queries_to_keep(truth: dict[str, np.ndarray]) -> int:
    """KEPT_QUERIES, or twice the most objects one name has in the image: a crowded scene's
    objects must all be findable among the kept queries, with room for wrong answers."""
    return max(KEPT_QUERIES, 2 * max((len(masks) for masks in truth.values()), default=0))


def best_queries(raw: RawPrediction, keep: int) -> RawPrediction:
    """The `keep` best-scoring queries of each prompt (all of them when there are fewer)."""
    if raw.scores.shape[1] <= keep:
        return raw
    order = np.argsort(-raw.scores, axis=1)[:, :keep]
    rows = np.arange(len(order))[:, None]
    return replace(raw, scores=raw.scores[rows, order], boxes=raw.boxes[rows, order], mask_logits=raw.mask_logits[rows, order])


def score(cases: list[EvalCase], threshold: float, *, refine: int = 0, label: str = "") -> EvalReport:
    """The report of `cases` at one score threshold: what `postprocess.select` would return."""
    return score_answers(answers(cases, refine=refine), threshold, label=label or (cases[0].raw.precision_used if cases else ""))


@dataclass
class PromptAnswers:
    """What one prompt of one image returns at any threshold, measured once: the scores of the
    masks `postprocess.select` can keep (one per object, best first, none empty) and their IoU
    with each ground-truth mask. A threshold keeps a prefix of them. Why: calibration scores
    ~150 thresholds and powers, and redoing `select`'s full-resolution masks for each made it
    take ~11 minutes of the demo model's export on a Zen 1 (~2.5 now, beside a training run)."""

    scores: np.ndarray  # (K,)
    ious: np.ndarray | None  # (objects, K); None for an absent prompt
    own_threshold: float | None = None  # the prompt's own threshold, which overrides any given

    def kept(self, threshold: float) -> int:
        cut = threshold if self.own_threshold is None else self.own_threshold
        return int(np.count_nonzero(self.scores >= cut))


def answers(cases: list[EvalCase], *, refine: int = 0) -> list[dict[str, PromptAnswers]]:
    """Per case, each prompt's `PromptAnswers` (keyed by prompt label)."""
    return [_case_answers(case, refine) for case in cases]


def _case_answers(case: EvalCase, refine: int) -> dict[str, PromptAnswers]:
    raw = case.raw
    everything = select(raw, threshold=0.0, refine=refine)  # what any threshold keeps is a prefix of this, prompt by prompt
    found: dict[int, list] = {}
    for inst in everything.instances:
        found.setdefault(inst.prompt_index, []).append(inst)
    table = {}
    for index, prompt in enumerate(raw.prompts):
        kept = found.get(index, [])
        truth = case.truth.get(prompt.label)
        if truth is None and prompt.label not in case.negatives:
            continue
        ious = None if truth is None else _iou_matrix(truth, [i.mask for i in kept])
        crowd = case.crowds.get(prompt.label)
        if crowd is not None and ious is not None:
            kept, ious = _without_crowd_answers(kept, ious, crowd)
        table[prompt.label] = PromptAnswers(np.array([i.score for i in kept], np.float32), ious, prompt.threshold)
    return table


def score_answers(cases: list[dict[str, PromptAnswers]], threshold: float, *, label: str = "") -> EvalReport:
    """`score` from answers measured once (see `answers`)."""
    ious: list[float] = []
    predicted = true_positive = duplicates = 0
    negatives = negative_hits = negative_predictions = 0
    for case in cases:
        for prompt in case.values():
            count = prompt.kept(threshold)
            if prompt.ious is not None:
                matched, extra = _match(prompt.ious[:, :count])
                ious += matched
                predicted += count
                true_positive += sum(iou >= 0.5 for iou in matched)
                duplicates += extra
            else:
                negatives += 1
                negative_hits += count > 0
                negative_predictions += count
    return EvalReport(
        precision=label,
        threshold=threshold,
        miou=float(np.mean(ious)) if ious else 0.0,
        precision_at_50=true_positive / predicted if predicted else 0.0,
        recall_at_50=true_positive / len(ious) if ious else 0.0,
        negative_fp_rate=negative_hits / negatives if negatives else 0.0,
        negative_predictions=negative_predictions,
        duplicates=duplicates,
        images=len(cases),
        instances=len(ious),
        seconds=0.0,
    )


# Calibration finds as much as it can while wrong answers stay rare (`calibrate_threshold`).
# The demo model's target is at most 10% of absent prompts answered on its test split; the
# validation split's 400 absent prompts measure a rate near 0.1 to about +-0.015, so calibration
# keeps a margin below it.
MAX_NEGATIVE_FP_RATE = 0.08
# ... and at least this share of the answers to present prompts right (IoU >= 0.5): without it,
# a model that never answers absent prompts would be calibrated to answer everything else.
MIN_PRECISION = 0.8


def calibrate_threshold(cases: list[EvalCase], candidates: np.ndarray | None = None, *, max_negative_fp: float = MAX_NEGATIVE_FP_RATE,
                        min_precision: float = MIN_PRECISION) -> float:
    """The lowest score threshold at which at most `max_negative_fp` of the absent prompts return
    anything and at least `min_precision` of the answers are right. Why the lowest: a lower
    threshold can only keep more answers, so it has the highest recall and mIoU, which is what a
    user asking for "every red car" wants. When no threshold meets both limits, the one closest
    to them: fewest absent prompts answered, then the most precise."""
    return _best_threshold(answers(cases), candidates, max_negative_fp, min_precision)[0]


# Mask-confidence powers `calibrate_scoring` tries (postprocess.with_mask_confidence).
MASK_CONFIDENCE_POWERS = (0.0, 1.0, 2.0, 4.0)


def calibrate_scoring(cases: list[EvalCase], *, max_negative_fp: float = MAX_NEGATIVE_FP_RATE, min_precision: float = MIN_PRECISION) -> tuple[float, float]:
    """(mask-confidence power, score threshold) best together: each power's threshold as
    `calibrate_threshold` picks it, and the power whose threshold reaches the highest mIoU within
    the limits. The cases collected with the model's own scores (power 0); ties go to the lower
    power. Only the KEPT_QUERIES best-scoring queries per prompt are rescored: all of the demo
    model's 16."""
    best_power, best_threshold, best_rank = 0.0, 0.5, None
    for power in MASK_CONFIDENCE_POWERS:
        rescored = [replace(c, raw=with_mask_confidence(c.raw, power)) for c in cases]
        threshold, rank = _best_threshold(answers(rescored), None, max_negative_fp, min_precision)
        if best_rank is None or rank > best_rank:
            best_power, best_threshold, best_rank = power, threshold, rank
    return best_power, best_threshold


def _best_threshold(cases: list[dict[str, PromptAnswers]], candidates: np.ndarray | None, max_negative_fp: float,
                    min_precision: float) -> tuple[float, tuple[int, float, float]]:
    """The threshold `calibrate_threshold` picks, and its rank (`_calibration_rank`)."""
    best_threshold, best_rank = 0.5, None
    for threshold in candidates if candidates is not None else np.round(np.arange(0.05, 0.951, 0.025), 3):
        rank = _calibration_rank(score_answers(cases, float(threshold)), max_negative_fp, min_precision)
        if best_rank is None or rank > best_rank or (rank == best_rank and threshold < best_threshold):
            best_threshold, best_rank = float(threshold), rank
    return best_threshold, best_rank


def _calibration_rank(report: EvalReport, max_negative_fp: float, min_precision: float) -> tuple[int, float, float]:
    """Higher is better. Within both limits (level 2), the mIoU; within the absent-prompt limit
    alone (1), the precision; within neither (0), fewer absent prompts answered, then precision."""
    if report.negative_fp_rate > max_negative_fp + 1e-9:
        return 0, -report.negative_fp_rate, report.precision_at_50
    if report.precision_at_50 < min_precision - 1e-9:
        return 1, report.precision_at_50, 0.0
    return 2, report.miou, 0.0


def _without_crowd_answers(kept: list, ious: np.ndarray, crowd: np.ndarray) -> tuple[list, np.ndarray]:
    """The answers less those COCO's evaluator ignores: at least half inside a crowd region of
    the prompt's name ("a crowd of people" annotated as one region) and matching none of its
    single objects at IoU 0.5. Such an answer may well be right, and nothing can say so."""
    inside = [i.mask[crowd].sum() >= 0.5 * max(i.mask.sum(), 1) for i in kept]
    keep = [k for k in range(len(kept)) if not inside[k] or (ious.shape[0] and ious[:, k].max() >= 0.5)]
    return [kept[k] for k in keep], ious[:, keep]


def _iou_matrix(truth: np.ndarray, found: list[np.ndarray]) -> np.ndarray:
    if not found:
        return np.zeros((len(truth), 0))
    return mask_iou_matrix(truth, np.stack(found))


def _match(ious: np.ndarray) -> tuple[list[float], int]:
    """(objects, found) IoUs -> the IoU of each object with its Hungarian-matched mask (0 when
    unmatched), and the duplicates: masks that are no object's match at IoU >= 0.5 yet cover an
    object by IoU >= 0.5, a second mask for something already found."""
    matched = [0.0] * len(ious)
    if not ious.shape[1]:
        return matched, 0
    rows, cols = linear_sum_assignment(-ious)
    for r, c in zip(rows, cols):
        matched[r] = float(ious[r, c])
    true_matches = {c for r, c in zip(rows, cols) if ious[r, c] >= 0.5}
    return matched, sum(1 for c in range(ious.shape[1]) if c not in true_matches and ious[:, c].max() >= 0.5)
