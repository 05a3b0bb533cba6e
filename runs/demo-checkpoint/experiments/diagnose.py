"""Where a demo checkpoint's errors come from: its masks, its scores, or its vision features.

    python diagnose.py CHECKPOINT --val /tmp/shapes/val --scenes 60

Prints, per prompt kind ("blue star" vs "star"):
- oracle mIoU and recall@0.5: each object's best IoU over all of its prompt's queries, whatever
  their scores. What a perfect scorer would reach; below it, the masks themselves are wrong.
- oracle mIoU by how many objects the prompt has (1, 2, 3 or more): can the queries tell
  two objects of one prompt apart, or does each query's mask cover all of them?
- the query boxes: each object's best box IoU over the queries, and the box IoU of the
  top-scoring query (the boxes are the decoder's own idea of where its query is);
- the scored metrics at a few thresholds (as `sam3studio eval` counts them);
- at each threshold, what the wrong answers are (see `wrong_answers`);
- through the checkpoint's category head (trainer file), how often the vision features' best
  category for an object pixel has the right shape and the right color;
- how well a linear probe names an object's shape from its mean-pooled vision features.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import torch

from backbone_proxy import right_shape_and_color  # the sibling script
from sam3studio.evaluate import answers, collect, score_answers
from sam3studio.postprocess import mask_box, select
from sam3studio.segmenter import load_segmenter
from sam3studio.train.data import CocoSegmentationData, TrainingSample
from sam3studio.train.presets import PROMPT_KINDS as KINDS
from sam3studio.train.presets import answers_of_kind
from sam3studio.train.shapes import COLORS, write_dataset


def oracle_ious(cases) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per prompt kind: each ground-truth object's best mask IoU over all queries of its prompt,
    its size (square root of its area over the image's) and how many objects its prompt has."""
    best: dict[str, list[float]] = {kind: [] for kind in KINDS}
    sizes: dict[str, list[float]] = {kind: [] for kind in KINDS}
    counts: dict[str, list[int]] = {kind: [] for kind in KINDS}
    for case in cases:
        height, width = case.raw.image_size
        rows = {p.text: r for r, p in enumerate(case.raw.prompts)}
        for name, truth in case.truth.items():
            logits = case.raw.mask_logits[rows[name]]
            masks = np.stack([cv2.resize(m, (width, height)) > 0 for m in logits]).reshape(len(logits), -1).astype(np.float32)
            wanted = truth.reshape(len(truth), -1).astype(np.float32)
            overlap = wanted @ masks.T
            iou = overlap / np.maximum(wanted.sum(1)[:, None] + masks.sum(1)[None] - overlap, 1)
            kind = next(k for k, keep in KINDS.items() if keep(name))
            best[kind] += iou.max(1).tolist()
            sizes[kind] += np.sqrt(wanted.sum(1) / (height * width)).tolist()
            counts[kind] += [len(truth)] * len(truth)
    return tuple({k: np.asarray(v) for k, v in table.items()} for table in (best, sizes, counts))


def box_ious(cases) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per prompt kind: each object's best box IoU over its prompt's queries, and the box IoU
    of its prompt's top-scoring query with it."""
    from torchvision.ops import box_iou

    found: dict[str, tuple[list[float], list[float]]] = {kind: ([], []) for kind in KINDS}
    for case in cases:
        rows = {p.text: r for r, p in enumerate(case.raw.prompts)}
        for name, truth in case.truth.items():
            row = rows[name]
            wanted = torch.tensor([mask_box(m) for m in truth])
            iou = box_iou(torch.from_numpy(np.array(case.raw.boxes[row])), wanted)  # (queries, objects)
            kind = next(k for k, keep in KINDS.items() if keep(name))
            found[kind][0].extend(iou.amax(0).tolist())
            found[kind][1].extend(iou[int(np.argmax(case.raw.scores[row]))].tolist())
    return {k: (np.asarray(best), np.asarray(top)) for k, (best, top) in found.items()}


def wrong_answers(cases, threshold: float) -> dict[str, int]:
    """Count the answers kept at `threshold` that `sam3studio eval` does not match to an object
    of their prompt at IoU 0.5, by what they cover: one of the prompt's own objects, badly drawn
    (IoU 0.1-0.5) or already found by a better answer; another object of the scene (most of the
    answer on it), one of the same color or of the same shape as the prompt asks, or neither;
    or background. Answers to absent prompts are all wrong; they are counted apart."""
    counts: dict[str, int] = {}
    for case in cases:
        objects = [(name, mask) for name, masks in case.truth.items() if " " in name for mask in masks]  # each object once
        found: dict[str, list] = {}
        for answer in select(case.raw, threshold=threshold).instances:
            found.setdefault(answer.label, []).append(answer)
        for name, answers in found.items():
            present = name in case.truth
            matched = set()
            for answer in sorted(answers, key=lambda a: -a.score):
                kind = _answer_kind(name, answer.mask, objects, matched)
                if kind != "right" or not present:
                    key = f"{'present' if present else 'absent'} prompt, {kind}"
                    counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def _answer_kind(prompt: str, answer: np.ndarray, objects: list[tuple[str, np.ndarray]], matched: set[int]) -> str:
    area = max(int(answer.sum()), 1)
    overlaps = [(int((answer & mask).sum()), index) for index, (_, mask) in enumerate(objects)]
    ious = {index: inter / (area + int(objects[index][1].sum()) - inter) for inter, index in overlaps}
    own = [i for i, (name, _) in enumerate(objects) if prompt in (name, name.split()[1])]
    best_own = max(own, key=lambda i: ious[i], default=None)
    if best_own is not None and ious[best_own] >= 0.5:
        if best_own in matched:
            return "a duplicate of its object"
        matched.add(best_own)
        return "right"
    if best_own is not None and ious[best_own] >= 0.1:
        return "its own object, badly drawn"
    inter, index = max(overlaps, default=(0, -1))
    if inter < area / 2:
        return "background or spread"
    other = objects[index][0].split()
    asked = prompt.split()
    if len(asked) == 2 and other[0] == asked[0]:
        return "another object of the same color"
    if other[1] == asked[-1]:
        return "another object of the same shape"
    return "another object, neither color nor shape"


def samples(data: CocoSegmentationData, images, count: int) -> Iterator[TrainingSample]:
    """The first `count` scenes as the model sees them, unflipped, with per-pixel category numbers."""
    for index in range(min(count, len(data))):
        yield data.sample(index, np.random.default_rng(index), input_size=images.size["height"], mask_size=images.mask_size["height"],
                          mean=images.image_mean, std=images.image_std, flip=False)


def finest_features(model, sample: TrainingSample) -> torch.Tensor:
    with torch.no_grad():
        return model.get_vision_features(pixel_values=torch.from_numpy(sample.pixels[None])).fpn_hidden_states[0]


def pixel_accuracy(checkpoint: str, model, processor, data: CocoSegmentationData, scenes: int) -> tuple[float, float]:
    """(shape, color) accuracy on object pixels of the category head over the vision features."""
    from safetensors.torch import load_file

    from sam3studio.train.loop import CATEGORY_HEAD_FILE, CategoryHead

    head = CategoryHead(model.config.vision_config.fpn_hidden_size, model.config.detr_encoder_config.hidden_size)
    head.load_state_dict(load_file(f"{checkpoint}/{CATEGORY_HEAD_FILE}"))
    names = [data.categories[c]["name"] for c in sorted(data.category_number)]
    tokens = processor.tokenizer(names, padding="max_length", max_length=32, return_tensors="pt")
    shape_right = color_right = seen = 0
    with torch.no_grad():
        text = model.get_text_features(**tokens).pooler_output
        valid = tokens["attention_mask"][..., None].float()
        text = (text * valid).sum(1) / valid.sum(1)
        for sample in samples(data, processor.image_processor, scenes):
            predicted = head(finest_features(model, sample), text)[0, 1:].argmax(0)  # best category, background aside
            on_object = torch.from_numpy(sample.categories > 0)
            truth = torch.from_numpy(sample.categories)[on_object] - 1
            shapes, colors = right_shape_and_color(predicted[on_object], truth)
            shape_right += shapes
            color_right += colors
            seen += len(truth)
    return shape_right / seen, color_right / seen


def pooled_shape_probe(model, images, train: CocoSegmentationData, val: CocoSegmentationData, scenes: tuple[int, int]) -> float:
    """Validation accuracy of a linear probe naming each object's shape from the mean of its
    finest vision features: can the shape be read from the features object by object? (Objects
    of one category in a scene are pooled together: the category map does not tell them apart.)"""
    colors = len(COLORS)

    def pooled(data: CocoSegmentationData, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        features, shapes = [], []
        for sample in samples(data, images, count):
            level0 = finest_features(model, sample)[0]
            labels = torch.from_numpy(sample.categories)
            for category in labels.unique().tolist():
                if category:
                    features.append(level0[:, labels == category].mean(1))
                    shapes.append((category - 1) // colors)
        return torch.stack(features), torch.tensor(shapes)

    (x_train, y_train), (x_val, y_val) = pooled(train, scenes[0]), pooled(val, scenes[1])
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    probe = torch.nn.Linear(x_train.shape[1], len(y_train.unique()))
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2)
    for _ in range(2000):
        loss = torch.nn.functional.cross_entropy(probe((x_train - mean) / std), y_train) + 1e-3 * probe.weight.pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return float((probe((x_val - mean) / std).argmax(1) == y_val).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--val", default="/tmp/shapes/val")
    parser.add_argument("--train", default="/tmp/shapes/train", help="scenes for the shape probe to learn from")
    parser.add_argument("--scenes", type=int, default=60)
    parser.add_argument("--thresholds", default="0.1,0.2,0.3,0.5")
    parser.add_argument("--features-only", action="store_true", help="only the vision features (a checkpoint of the encoder stage)")
    parser.add_argument("--queries-only", action="store_true", help="only the answers, not the vision features")
    args = parser.parse_args()
    if not Path(args.val, "annotations.json").is_file():
        write_dataset(args.val, 200, 202)  # the demo recipe's validation split
    if not Path(args.train, "annotations.json").is_file():
        write_dataset(args.train, 600, 101)
    data = CocoSegmentationData(args.val)
    if not args.features_only:
        queries(args, data)
    if not args.queries_only:
        features(args, data)


def queries(args, data: CocoSegmentationData) -> None:
    """Oracle and scored metrics of the model's answers, per prompt kind."""
    seg = load_segmenter(args.checkpoint, precision="fp32", device="cpu", force_precision=True)
    cases, _ = collect(seg, data, precision="fp32", limit=args.scenes)
    oracle, sizes, counts = oracle_ious(cases)
    boxes = box_ious(cases)
    for kind, best in oracle.items():
        print(f"{kind}: {len(best)} objects, oracle mIoU {best.mean():.3f}, oracle recall@0.5 {(best >= 0.5).mean():.3f}")
        for low, high in ((0, 0.1), (0.1, 0.2), (0.2, 0.3), (0.3, 1)):
            within = (sizes[kind] >= low) & (sizes[kind] < high)
            if within.any():
                print(f"  objects {low:.1f}-{high:.1f} of the image side: {within.sum()}, oracle mIoU {best[within].mean():.3f}")
        for count in (1, 2, 3):
            within = counts[kind] == count if count < 3 else counts[kind] >= count
            if within.any():
                print(f"  objects whose prompt has {count}{'+' if count == 3 else ''}: {within.sum()}, oracle mIoU {best[within].mean():.3f}")
        best_box, top_box = boxes[kind]
        print(f"  query boxes: best box IoU {best_box.mean():.3f} (>= 0.5: {(best_box >= 0.5).mean():.3f}), top-scoring query's {top_box.mean():.3f}")
    measured = answers(cases)
    for threshold in (float(t) for t in args.thresholds.split(",")):
        for kind, keep in {"all": lambda name: True, **KINDS}.items():
            subset = answers_of_kind(measured, keep)
            r = score_answers(subset, threshold)
            absent = sum(a.ious is None for case in subset for a in case.values())
            print(f"threshold {threshold:g} {kind:>27}: mIoU {r.miou:.3f}, precision@0.5 {r.precision_at_50:.3f}, "
                  f"recall@0.5 {r.recall_at_50:.3f}, FP absent {r.negative_fp_rate:.3f} of {absent}")
        for what, count in wrong_answers(cases, threshold).items():
            print(f"  wrong answers at {threshold:g}, {what}: {count}")


def features(args, data: CocoSegmentationData) -> None:
    """What the vision features know: per pixel through the category head, per object by a probe."""
    from transformers import Sam3Model, Sam3Processor

    model = Sam3Model.from_pretrained(args.checkpoint).eval()
    processor = Sam3Processor.from_pretrained(args.checkpoint)
    shape, color = pixel_accuracy(args.checkpoint, model, processor, data, 100)
    print(f"object pixels (100 scenes), category head: shape accuracy {shape:.3f}, color accuracy {color:.3f}")
    probed = pooled_shape_probe(model, processor.image_processor, CocoSegmentationData(args.train), data, (600, 100))
    print(f"objects, mean-pooled features, linear probe (600 training scenes, 100 validation): shape accuracy {probed:.3f}")


if __name__ == "__main__":
    main()
