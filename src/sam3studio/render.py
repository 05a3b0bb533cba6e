"""Draw results over the image: one distinct color per instance, translucent fill, bright
edges, and a "label 0.87" tag. Also the (image, [(mask, label)]) form Gradio's AnnotatedImage takes.
"""

from __future__ import annotations

import colorsys
import math

import cv2
import numpy as np

from .types import Instance, Result

_GOLDEN_RATIO = 0.618033988749895


def instance_color(index: int) -> tuple[int, int, int]:
    """Well-separated RGB colors: hues stepped by the golden ratio, so neighbours differ."""
    hue = (0.12 + index * _GOLDEN_RATIO) % 1.0
    red, green, blue = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return (int(red * 255), int(green * 255), int(blue * 255))


def instance_caption(instance: Instance) -> str:
    return f"{instance.label} {instance.score:.2f}"


def overlay(
    image: np.ndarray,
    result: Result,
    *,
    alpha: float = 0.45,
    edges: bool = True,
    captions: bool = True,
) -> np.ndarray:
    """Return a new (H, W, 3) uint8 image with every instance drawn on `image`."""
    canvas = image.astype(np.float32)
    scale = math.hypot(*image.shape[:2]) / 1000  # line width and font grow with the image
    thickness = max(1, round(2 * scale))
    for index, inst in enumerate(result.instances):
        color = np.array(instance_color(index), dtype=np.float32)
        canvas[inst.mask] = canvas[inst.mask] * (1 - alpha) + color * alpha
    canvas = canvas.round().astype(np.uint8)
    if edges:
        for index, inst in enumerate(result.instances):
            contours, _ = cv2.findContours(inst.mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(canvas, contours, -1, _brighter(instance_color(index)), thickness, cv2.LINE_AA)
    if captions:
        for index, inst in enumerate(result.instances):
            _draw_caption(canvas, instance_caption(inst), inst.box, instance_color(index), max(0.4, 0.6 * scale))
    return canvas


def annotated_sections(image: np.ndarray, result: Result) -> tuple[np.ndarray, list[tuple[np.ndarray, str]]]:
    """(image, [(mask as float32 0/1, "1. label 0.87"), ...]) in result order, for
    gr.AnnotatedImage. Numbered, so that every caption is unique (two dogs scoring 0.55 are
    two regions) and names its row in a table of the instances."""
    return image, [(inst.mask.astype(np.float32), f"{i + 1}. {instance_caption(inst)}") for i, inst in enumerate(result.instances)]


def _brighter(color: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(min(255, int(c * 0.6 + 255 * 0.4)) for c in color)  # type: ignore[return-value]


def _draw_caption(canvas: np.ndarray, text: str, box, color, font_scale: float) -> None:
    font = cv2.FONT_HERSHEY_SIMPLEX
    (width, height), baseline = cv2.getTextSize(text, font, font_scale, 1)
    x = int(min(max(box[0], 0), max(canvas.shape[1] - width - 2, 0)))
    y = int(box[1]) - 3
    if y - height - baseline < 0:  # no room above the box: write inside it
        y = int(box[1]) + height + 3
    cv2.rectangle(canvas, (x, y - height - baseline), (x + width + 2, y + 2), color, cv2.FILLED)
    ink = (0, 0, 0) if sum(color) > 380 else (255, 255, 255)
    cv2.putText(canvas, text, (x + 1, y - baseline // 2), font, font_scale, ink, 1, cv2.LINE_AA)
