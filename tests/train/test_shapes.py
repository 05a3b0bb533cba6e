import json

import numpy as np
from pycocotools.coco import COCO

from sam3studio.train.shapes import CATEGORIES, SceneConfig, render_scene, write_dataset


def test_scenes_vary_and_masks_hold_visible_parts_only():
    rng = np.random.default_rng(0)
    sizes, counts = set(), []
    for _ in range(12):
        image, instances = render_scene(rng, SceneConfig(min_side=96, max_side=160))
        sizes.add(image.shape[:2])
        counts.append(len(instances))
        union = np.zeros(image.shape[:2], dtype=int)
        for inst in instances:
            assert inst["mask"].shape == image.shape[:2] and inst["mask"].any()
            assert inst["category"] in CATEGORIES
            union += inst["mask"]
        assert union.max() <= 1, "occluded parts belong to the object in front only"
    assert len(sizes) > 6 and any(h != w for h, w in sizes)
    assert min(counts) >= 1 and max(counts) > 1


def test_colored_pixels_match_their_color_name():
    rng = np.random.default_rng(1)
    image, instances = render_scene(rng, SceneConfig(min_side=200, max_side=200))
    import cv2

    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    for inst in instances:
        inner = cv2.erode(inst["mask"].astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        if inner.sum() < 30:
            continue
        hue = float(np.median(hsv[..., 0][inner])) * 2
        expected = {"red": 0, "orange": 28, "yellow": 55, "green": 120, "blue": 220, "purple": 280}[inst["color"]]
        assert min(abs(hue - expected), 360 - abs(hue - expected)) < 25, (inst["color"], hue)


def test_dataset_is_valid_coco(tmp_path):
    folder = write_dataset(tmp_path / "shapes", count=5, seed=3, config=SceneConfig(min_side=64, max_side=96))
    doc = json.loads((folder / "annotations.json").read_text())
    assert len(doc["images"]) == 5 and len(doc["categories"]) == 24
    assert {c["supercategory"] for c in doc["categories"]} == {"circle", "square", "triangle", "star"}
    coco = COCO(str(folder / "annotations.json"))
    for ann in coco.anns.values():
        assert coco.annToMask(ann).sum() == ann["area"] > 0
    assert all((folder / "images" / i["file_name"]).is_file() for i in doc["images"])
    again = write_dataset(tmp_path / "again", count=5, seed=3, config=SceneConfig(min_side=64, max_side=96))
    assert (again / "annotations.json").read_text() == (folder / "annotations.json").read_text()
