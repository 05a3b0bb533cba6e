"""Synthetic scenes of colored shapes with exact instance masks, written as a COCO dataset.

Every instance's category is "<color> <shape>" ("red circle") and its supercategory is the
shape ("circle"), so a trainer that prompts with both names learns colors and shapes. Scenes
vary in size, background (flat, gradient, noise, stripes), object count, scale, rotation,
overlap (masks hold the visible part only), shading, outlines, blur and JPEG noise, so that a
model learns shapes and colors rather than this renderer's quirks.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..export import encode_rle

COLORS = {  # hue in degrees (OpenCV HSV uses 0-180), saturation and value ranges are shared
    "red": 0,
    "orange": 28,
    "yellow": 55,
    "green": 120,
    "blue": 220,
    "purple": 280,
}
SHAPES = ("circle", "square", "triangle", "star")
CATEGORIES = [f"{color} {shape}" for shape in SHAPES for color in COLORS]


@dataclass(frozen=True)
class SceneConfig:
    min_side: int = 256
    max_side: int = 640
    max_objects: int = 6


def color_rgb(name: str, rng: np.random.Generator) -> tuple[int, int, int]:
    """A random shade of a named color: hue +-8 degrees, strong saturation, mid-to-high value."""
    hue = (COLORS[name] + rng.uniform(-8, 8)) % 360
    sat = rng.uniform(0.65, 1.0)
    val = rng.uniform(0.6, 1.0) if name != "purple" else rng.uniform(0.5, 0.9)
    hsv = np.array([[[hue / 2, sat * 255, val * 255]]], dtype=np.float32).astype(np.uint8)
    return tuple(int(c) for c in cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0])


def shape_polygon(shape: str, center: tuple[float, float], radius: float, angle: float) -> np.ndarray | None:
    """Vertices of a square, triangle or star (None for a circle, drawn as an ellipse)."""
    if shape == "circle":
        return None
    if shape == "square":
        points = [(math.cos(a), math.sin(a)) for a in np.arange(4) * math.pi / 2 + math.pi / 4]
    elif shape == "triangle":
        points = [(math.cos(a), math.sin(a)) for a in np.arange(3) * 2 * math.pi / 3 - math.pi / 2]
    else:  # five-pointed star, inner radius 0.45
        points = [
            (r * math.cos(a), r * math.sin(a))
            for i, a in enumerate(np.arange(10) * math.pi / 5 - math.pi / 2)
            for r in [1.0 if i % 2 == 0 else 0.45]
        ]
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return (np.array(points) @ rotation.T * radius + np.array(center)).astype(np.float32)


def _shape_mask(shape: str, size: tuple[int, int], center, radius: float, angle: float, squash: float) -> np.ndarray:
    """Binary mask drawn at 4x and reduced, so that edges are placed to a quarter pixel."""
    scale = 4
    canvas = np.zeros((size[0] * scale, size[1] * scale), dtype=np.uint8)
    c = (center[0] * scale, center[1] * scale)
    if shape == "circle":
        axes = (int(radius * scale), int(radius * scale * squash))
        cv2.ellipse(canvas, (int(c[0]), int(c[1])), axes, math.degrees(angle), 0, 360, 255, -1)
    else:
        polygon = shape_polygon(shape, c, radius * scale, angle)
        cv2.fillPoly(canvas, [np.round(polygon).astype(np.int32)], 255)
    small = cv2.resize(canvas, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    return small >= 128


def _background(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Muted backgrounds, so that the named colors stay the saturated things in the scene."""
    base = rng.uniform(20, 235, 3)
    kind = rng.choice(["flat", "gradient", "noise", "stripes"])
    image = np.broadcast_to(base, (height, width, 3)).astype(np.float32)
    if kind == "gradient":
        other = rng.uniform(20, 235, 3)
        t = np.linspace(0, 1, width if rng.random() < 0.5 else height, dtype=np.float32)
        ramp = t[None, :, None] if t.size == width else t[:, None, None]
        image = image * (1 - ramp) + other * ramp
    elif kind == "noise":
        coarse = rng.normal(0, 25, (max(2, height // 32), max(2, width // 32), 3)).astype(np.float32)
        image = image + cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    elif kind == "stripes":
        period = rng.uniform(12, 60)
        stripes = (np.sin(np.arange(width) * 2 * math.pi / period) > 0).astype(np.float32)
        image = image + stripes[None, :, None] * rng.uniform(-30, 30, 3)
    # Pull toward gray: keep backgrounds from looking like one of the named colors.
    gray = image.mean(axis=2, keepdims=True)
    return gray + (image - gray) * rng.uniform(0.0, 0.35)


def render_scene(rng: np.random.Generator, config: SceneConfig = SceneConfig()) -> tuple[np.ndarray, list[dict]]:
    """One scene: (H, W, 3) uint8 image and instances [{"category", "shape", "color", "mask"}]."""
    height, width = (int(v) for v in rng.integers(config.min_side, config.max_side + 1, 2))
    image = _background(height, width, rng)
    placed: list[dict] = []
    for _ in range(int(rng.integers(1, config.max_objects + 1))):
        shape, color = str(rng.choice(SHAPES)), str(rng.choice(list(COLORS)))
        radius = rng.uniform(0.06, 0.22) * min(height, width)
        center = (rng.uniform(radius * 0.6, width - radius * 0.6), rng.uniform(radius * 0.6, height - radius * 0.6))
        mask = _shape_mask(shape, (height, width), center, radius, rng.uniform(0, 2 * math.pi), rng.uniform(0.8, 1.0))
        if not mask.any():
            continue
        rgb = np.array(color_rgb(color, rng), dtype=np.float32)
        shading = 1 + rng.uniform(-0.15, 0.15) * np.linspace(-1, 1, width, dtype=np.float32)[None, :, None]
        image[mask] = np.broadcast_to(rgb * shading, image.shape)[mask]  # a soft left-right shading
        if rng.random() < 0.3:  # a dark or light outline
            edge = mask & ~cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
            image[edge] = rng.choice([30.0, 225.0])
        for earlier in placed:
            earlier["mask"] &= ~mask
        placed.append({"category": f"{color} {shape}", "shape": shape, "color": color, "mask": mask})
    image = _camera_effects(np.clip(image, 0, 255), rng)
    # Every object with a visible pixel is annotated: an unlabeled one would turn a correct
    # answer into a false positive, and could even be drawn as an "absent" negative prompt.
    return image, [p for p in placed if p["mask"].any()]


def _camera_effects(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    image = image + rng.normal(0, rng.uniform(0, 6), image.shape)
    if rng.random() < 0.3:
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.4, 1.2))
    image = np.clip(image, 0, 255).astype(np.uint8)
    if rng.random() < 0.3:
        ok, data = cv2.imencode(".jpg", image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(50, 95))])
        image = cv2.imdecode(data, cv2.IMREAD_COLOR)[..., ::-1]
    return np.ascontiguousarray(image)


def write_dataset(folder: str | Path, count: int, seed: int, config: SceneConfig = SceneConfig()) -> Path:
    """Render `count` scenes into folder/images and folder/annotations.json (COCO, RLE masks).

    Every one of the 24 "<color> <shape>" categories is listed, present or not, so that a
    trainer can draw negative prompts (things absent from a scene) from the category list.
    """
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    category_ids = {name: i + 1 for i, name in enumerate(CATEGORIES)}
    images, annotations = [], []
    for index in range(count):
        image, instances = render_scene(rng, config)
        name = f"scene_{index:05d}.png"
        cv2.imwrite(str(folder / "images" / name), image[..., ::-1])
        images.append({"id": index + 1, "file_name": name, "height": image.shape[0], "width": image.shape[1]})
        for inst in instances:
            ys, xs = np.nonzero(inst["mask"])
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": category_ids[inst["category"]],
                    "segmentation": encode_rle(inst["mask"]),
                    "area": int(inst["mask"].sum()),
                    "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i, "name": n, "supercategory": n.split(" ")[1]} for n, i in category_ids.items()]
    document = {"info": {"description": f"sam3studio shapes, seed {seed}"}, "images": images, "annotations": annotations, "categories": categories}
    (folder / "annotations.json").write_text(json.dumps(document))
    return folder
