"""COCO instance-segmentation data as SAM3 training samples: one image, several text prompts
(category names, supercategory names, and names absent from the image as negatives), each with
its target masks and boxes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as coco_mask

from ..images import load_image
from ..prompts import MAX_PROMPT_CHARS


class DataError(ValueError):
    """A dataset that cannot be trained on; the message names what is wrong and where."""


@dataclass
class PromptTarget:
    """One prompt and everything it should find. masks: (N, M, M) float32 in [0, 1] (area
    fractions at mask resolution); boxes: (N, 4) normalised xyxy. N = 0 for a negative."""

    text: str
    masks: np.ndarray
    boxes: np.ndarray


@dataclass
class TrainingSample:
    pixels: np.ndarray  # (3, S, S) float32, normalised as the model's processor does
    prompts: list[PromptTarget]
    categories: np.ndarray  # (M, M) int64: each mask pixel's category number, 0 for background


class CocoSegmentationData:
    """A validated COCO dataset: every image present, every annotation inside its image and of
    a known category. Masks may be RLE (compressed or not) or polygons."""

    def __init__(self, root: str | Path, *, annotations: str = "annotations.json", images: str = "images", supercategory_prompts: bool = True):
        self.root = Path(root)
        path = self.root / annotations
        if not path.is_file():
            raise DataError(f"{path}: no annotation file (a COCO instances JSON).")
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: not readable JSON ({exc}).") from None
        if not isinstance(document, dict):
            raise DataError(f"{path}: a COCO file is a JSON object with images, annotations and categories.")
        self.image_dir = self.root / images
        self.images = _index(document.get("images", []), "image", {"file_name": str, "width": int, "height": int}, path)
        self.categories = _index(document.get("categories", []), "category", {"name": str}, path)
        self.annotations = document.get("annotations", [])
        self.supercategory_prompts = supercategory_prompts
        self._validate(path)
        self.by_image: dict[int, list[dict]] = {i: [] for i in self.images}
        self._crowds_by_image: dict[int, list[dict]] = {i: [] for i in self.images}
        # Every name annotated on an image, crowds included: none of them may be drawn as absent.
        self._names_on_image: dict[int, set[str]] = {i: set() for i in self.images}
        for ann in self.annotations:
            image_id = int(ann["image_id"])
            self._names_on_image[image_id].update(self._names(self.categories[int(ann["category_id"])]))
            # Crowd regions mark "many of these", not one instance: no training target, and in eval
            # an answer inside one is neither right nor wrong (crowd_regions).
            (self._crowds_by_image if ann.get("iscrowd") else self.by_image)[image_id].append(ann)
        self.image_ids = sorted(self.images)
        self.vocabulary = sorted({name for c in self.categories.values() for name in self._names(c)})
        _check_names_as_prompts(self.vocabulary, path)
        # Supercategory names used as prompts ("star" for any colored star), as opposed to categories.
        self.coarse_names = sorted({n for c in self.categories.values() for n in self._names(c)[1:]})
        self.category_number = {cid: n for n, cid in enumerate(sorted(self.categories), start=1)}

    def _validate(self, path: Path) -> None:
        if not self.images or not self.annotations:
            raise DataError(f"{path}: no {'images' if not self.images else 'annotations'}: nothing to learn from.")
        missing = [i["file_name"] for i in self.images.values() if not (self.image_dir / i["file_name"]).is_file()]
        if missing:
            raise DataError(f"{len(missing)} image files listed in {path.name} are missing from {self.image_dir}, e.g. {missing[:3]}.")
        for ann in self.annotations:
            where = f"{path.name}: annotation {ann.get('id') if isinstance(ann, dict) else ann!r}"
            try:
                ann["image_id"], ann["category_id"] = _integer(ann["image_id"]), _integer(ann["category_id"])
            except (KeyError, TypeError, ValueError):
                raise DataError(f"{where} needs integer image_id and category_id.") from None
            if int(ann.get("category_id", -1)) not in self.categories:
                raise DataError(f"{where} has unknown category_id {ann.get('category_id')}.")
            image = self.images.get(int(ann.get("image_id", -1)))
            if image is None:
                raise DataError(f"{where} refers to image_id {ann.get('image_id')}, which is not listed.")
            _check_inside(ann, image, where)

    def _names(self, category: dict) -> list[str]:
        names = [category["name"]]
        if self.supercategory_prompts and category.get("supercategory") and category["supercategory"] != category["name"]:
            names.append(category["supercategory"])
        return names

    def absent_names(self, index: int) -> list[str]:
        """The vocabulary's names annotated nowhere on the image at `index`, crowds and empty
        masks included: the only names that may be asked of it as negative prompts."""
        annotated = self._names_on_image[self.image_ids[index]]
        return [n for n in self.vocabulary if n not in annotated]

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, index: int) -> Path:
        return self.image_dir / self.images[self.image_ids[index]]["file_name"]

    def _image(self, index: int) -> np.ndarray:
        """The decoded image, checked against the size its annotations were drawn on."""
        image = load_image(self.image_path(index))
        self.check_decoded_size(index, image.shape[:2])
        return image

    def check_decoded_size(self, index: int, size: tuple[int, int]) -> None:
        """Refuse an image that decodes (after EXIF rotation) to another size than its entry
        says: its masks would not line up with it."""
        info = self.images[self.image_ids[index]]
        if tuple(size) != (info["height"], info["width"]):
            raise DataError(
                f"{info['file_name']}: decoded as {size[1]}x{size[0]} (after EXIF rotation), but the annotations "
                f"say {info['width']}x{info['height']}; masks would not line up. Re-export the dataset."
            )

    def ground_truth(self, index: int) -> dict[str, np.ndarray]:
        """{prompt name: (N, H, W) bool masks at full resolution} for the names present."""
        info = self.images[self.image_ids[index]]
        groups: dict[str, list[np.ndarray]] = {}
        for ann in self.by_image[self.image_ids[index]]:
            mask = _decode(ann, info["height"], info["width"])
            if not mask.any():
                continue
            for name in self._names(self.categories[int(ann["category_id"])]):
                groups.setdefault(name, []).append(mask)
        return {name: np.stack(masks) for name, masks in groups.items()}

    def crowd_regions(self, index: int) -> dict[str, np.ndarray]:
        """{prompt name: (H, W) bool union of its crowd regions} for the names with any."""
        info = self.images[self.image_ids[index]]
        regions: dict[str, np.ndarray] = {}
        for ann in self._crowds_by_image[self.image_ids[index]]:
            mask = _decode(ann, info["height"], info["width"])
            for name in self._names(self.categories[int(ann["category_id"])]):
                regions[name] = regions[name] | mask if name in regions else mask
        return regions

    def sample(self, index: int, rng: np.random.Generator, *, input_size: int, mask_size: int, mean, std, negatives: int = 2,
               coarse_negatives: int = 0, flip: bool = True) -> TrainingSample:
        """The image at `index` with one prompt per name present and up to `negatives` absent names,
        `coarse_negatives` of them absent supercategory names when there are such."""
        info = self.images[self.image_ids[index]]
        image = self._image(index)
        masks = [_decode(a, info["height"], info["width"]) for a in self.by_image[self.image_ids[index]]]
        anns = [a for a, m in zip(self.by_image[self.image_ids[index]], masks) if m.any()]  # empty masks teach nothing
        masks = np.stack([m for m in masks if m.any()]) if anns else np.zeros((0, *image.shape[:2]), bool)
        if flip and rng.random() < 0.5:
            image, masks = image[:, ::-1], masks[:, :, ::-1]
        pixels = cv2.resize(image, (input_size, input_size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
        pixels = ((pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).transpose(2, 0, 1)
        groups: dict[str, list[int]] = {}
        for i, ann in enumerate(anns):
            for name in self._names(self.categories[int(ann["category_id"])]):
                groups.setdefault(name, []).append(i)
        absent = self.absent_names(index)
        coarse = _coarse_negatives([n for n in absent if n in self.coarse_names], min(coarse_negatives, negatives), rng)
        chosen = coarse + _negatives([n for n in absent if n not in coarse], list(groups), negatives - len(coarse), rng)
        prompts = [_target(name, masks[idx], mask_size) for name, idx in groups.items()]
        prompts += [PromptTarget(name, np.zeros((0, mask_size, mask_size), np.float32), np.zeros((0, 4), np.float32)) for name in chosen]
        numbers = [self.category_number[int(a["category_id"])] for a in anns]
        return TrainingSample(np.ascontiguousarray(pixels), prompts, _category_map(masks, numbers, mask_size))


def _negatives(absent: list[str], present: list[str], count: int, rng: np.random.Generator) -> list[str]:
    """Up to `count` absent names, half of them hard: sharing a word with a present name
    ("red star" beside a blue star). Random negatives alone ("square" where nothing is
    square) can be told apart without reading the prompt closely; hard ones cannot, so the
    model learns to attend to every word of it."""
    words = {w for name in present for w in name.split()}
    hard = [n for n in absent if words & set(n.split())]
    picked = rng.choice(hard, size=min((count + 1) // 2, len(hard)), replace=False).tolist() if hard else []
    rest = [n for n in absent if n not in picked]
    picked += rng.choice(rest, size=min(count - len(picked), len(rest)), replace=False).tolist() if rest else []
    return picked


def _coarse_negatives(absent_coarse: list[str], count: int, rng: np.random.Generator) -> list[str]:
    """Up to `count` absent supercategory names. Drawn uniformly from all absent names, they are
    rare (4 of the shapes data's 28 names, and only the absent ones), while every present
    supercategory is a positive prompt: a model so trained answers "circle" with something
    whether or not a circle is there (it did, on every absent shape-only test prompt)."""
    if count <= 0 or not absent_coarse:
        return []
    return rng.choice(absent_coarse, size=min(count, len(absent_coarse)), replace=False).tolist()


def _category_map(masks: np.ndarray, numbers: list[int], mask_size: int) -> np.ndarray:
    """Each mask pixel's category number (0 where no instance covers half of it); where
    instances overlap, the later annotation wins, as when they are painted in order."""
    labels = np.zeros((mask_size, mask_size), np.int64)
    for mask, number in zip(masks, numbers):
        small = cv2.resize(mask.astype(np.float32), (mask_size, mask_size), interpolation=cv2.INTER_AREA)
        labels[small >= 0.5] = number
    return labels


def _target(name: str, masks: np.ndarray, mask_size: int) -> PromptTarget:
    small = np.stack([cv2.resize(m.astype(np.float32), (mask_size, mask_size), interpolation=cv2.INTER_AREA) for m in masks])
    height, width = masks.shape[1:]
    boxes = []
    for m in masks:
        ys, xs = np.nonzero(m)
        boxes.append([xs.min() / width, ys.min() / height, (xs.max() + 1) / width, (ys.max() + 1) / height])
    return PromptTarget(name, small, np.asarray(boxes, np.float32))


def _decode(ann: dict, height: int, width: int) -> np.ndarray:
    segmentation = ann["segmentation"]
    if isinstance(segmentation, list):  # polygons
        rle = coco_mask.merge(coco_mask.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        rle = coco_mask.frPyObjects(segmentation, height, width)
    else:
        counts = segmentation["counts"]
        rle = {"size": segmentation["size"], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return coco_mask.decode(rle).astype(bool)


def _check_inside(ann: dict, image: dict, where: str) -> None:
    height, width = int(image["height"]), int(image["width"])
    segmentation = ann.get("segmentation")
    if isinstance(segmentation, dict):
        if [int(v) for v in segmentation.get("size", [])] != [height, width]:
            raise DataError(f"{where}: mask size {segmentation.get('size')} is not the image's {[height, width]}.")
        # pycocotools decodes runs that stop short with whatever memory follows, and refuses
        # runs that overshoot only when the mask is first used: check them here, once.
        if _rle_pixels(segmentation.get("counts")) != height * width:
            raise DataError(f"{where}: its RLE counts do not cover the {width}x{height} image exactly; the mask is corrupt.")
    elif isinstance(segmentation, list) and segmentation:
        if any(len(p) < 6 or len(p) % 2 for p in segmentation):
            raise DataError(f"{where}: a polygon needs an even number of coordinates, at least 3 points.")
        points = np.concatenate([np.asarray(p, dtype=float).reshape(-1, 2) for p in segmentation])
        if points.min() < -1 or points[:, 0].max() > width + 1 or points[:, 1].max() > height + 1:
            raise DataError(f"{where}: polygon points lie outside the {width}x{height} image.")
    else:
        raise DataError(f"{where} has no segmentation.")
    x, y, w, h = (float(v) for v in ann.get("bbox", [0, 0, 0, 0]))
    if x < -1 or y < -1 or x + w > width + 1 or y + h > height + 1:
        raise DataError(f"{where}: bbox {ann.get('bbox')} lies outside the {width}x{height} image.")


def _check_names_as_prompts(names: list[str], path: Path) -> None:
    """Names are the prompts, so each must be one the segmenter takes (refused here, not when
    an eval or training run reaches the first image that has it), and SAM3's tokenizer
    lowercases: "Star" and "star" would be one prompt answering for two sets of objects."""
    seen: dict[str, str] = {}
    for name in names:
        if not name.strip() or len(name) > MAX_PROMPT_CHARS:
            raise DataError(f"{path.name}: the category name {name[:40]!r} is {'blank' if not name.strip() else f'{len(name)} characters long'}; "
                            f"names are the prompts, of 1 to {MAX_PROMPT_CHARS} characters.")
        other = seen.setdefault(" ".join(name.lower().split()), name)
        if other != name:
            raise DataError(f"{path.name}: the names {other!r} and {name!r} differ only in case or spacing; SAM3 reads them as one prompt. Merge them.")


def _index(entries: object, kind: str, required: dict[str, type], path: Path) -> dict[int, dict]:
    """{id: entry} of COCO's images or categories, refusing entries without the fields used
    later and ids given twice (a second image with the same id would take the first's masks).
    Numbers written as strings or floats ("3", 640.0) are read as the integers they are."""
    if not isinstance(entries, list):
        raise DataError(f"{path.name}: '{kind}' entries must be a list.")
    fields = {"id": int, **required}
    table: dict[int, dict] = {}
    for entry in entries:
        try:
            entry = {**entry, **{k: _integer(entry[k]) for k, t in fields.items() if t is int}}
            if not all(isinstance(entry[k], str) and entry[k].strip() for k, t in fields.items() if t is str):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            wanted = ", ".join(f"{k} ({'text' if t is str else 'integer'})" for k, t in fields.items())
            raise DataError(f"{path.name}: {kind} entry {entry!r:.120} needs {wanted}.") from None
        if entry["id"] in table:
            raise DataError(f"{path.name}: {kind} id {entry['id']} is given twice.")
        table[entry["id"]] = entry
    return table


def _integer(value: object) -> int:
    if isinstance(value, bool) or float(value) != int(float(value)):
        raise ValueError(value)
    return int(float(value))


def _rle_pixels(counts: object) -> int:
    """How many pixels an RLE's runs cover: list counts as they are, or COCO's compressed
    string (5 bits a character, a continuation bit, a sign bit, later runs as differences)."""
    if isinstance(counts, list):
        return sum(counts) if all(isinstance(c, int) and c >= 0 for c in counts) else -1
    if not isinstance(counts, str):
        return -1
    runs: list[int] = []
    value = shift = 0
    for char in counts:
        code = ord(char) - 48
        value |= (code & 0x1F) << shift
        shift += 5
        if code & 0x20:
            continue
        if code & 0x10:
            value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
        value = shift = 0
    return sum(runs) if shift == 0 and all(r >= 0 for r in runs) else -1
