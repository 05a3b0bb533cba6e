"""Plain data passed between the stages of the pipeline.

Every front end (CLI, REST, web UI) and every exporter takes these, so they hold numpy arrays and
Python numbers only: no tensors, no model state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Prompt:
    """One thing to look for: a text phrase and/or box exemplars.

    `threshold` overrides the call's score threshold for this prompt only ("dog:0.3").
    Boxes are xyxy in original-image pixels; `box_labels` holds 1 (positive) or 0 (negative).
    """

    text: str
    threshold: float | None = None
    boxes: tuple[tuple[float, float, float, float], ...] = ()
    box_labels: tuple[int, ...] = ()

    @property
    def label(self) -> str:
        """The name shown for matches: the text, or a stand-in for a box-only prompt."""
        return self.text or "exemplar"


@dataclass
class Instance:
    """One matched object.

    mask: (H, W) bool in original-image pixels, never empty. box: (x0, y0, x1, y1) in pixels,
    the tight box of the mask, so that box, mask, RLE and polygons always agree.
    """

    label: str
    score: float
    box: tuple[float, float, float, float]
    mask: np.ndarray
    prompt_index: int

    @property
    def area(self) -> int:
        return int(self.mask.sum())


@dataclass
class Result:
    """Everything one `segment` call found, in a stable order: prompt order, then score descending.

    The order is part of the contract: the web UI maps a clicked region to the same row that the
    REST API returns.
    """

    instances: list[Instance]
    image_size: tuple[int, int]  # (height, width)
    prompts: list[Prompt]
    model: str
    precision_requested: str
    precision_used: str
    fallback_fp32: bool = False
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def height(self) -> int:
        return self.image_size[0]

    @property
    def width(self) -> int:
        return self.image_size[1]


@dataclass
class RawPrediction:
    """The model's outputs for one (image, prompts, precision), before any threshold.

    Post-processing reads only this, so a new threshold or refinement level never reruns the
    model. P prompts, Q queries per prompt; mask logits are at the model's mask resolution.
    """

    image_size: tuple[int, int]  # (height, width) of the original image
    prompts: list[Prompt]
    scores: np.ndarray  # (P, Q) float32: sigmoid(query logit) * sigmoid(presence logit), times the mask's confidence for some models
    boxes: np.ndarray  # (P, Q, 4) float32, xyxy in original-image pixels
    mask_logits: np.ndarray  # (P, Q, h, w) float32
    model: str
    precision_requested: str
    precision_used: str
    fallback_fp32: bool = False
    timings_ms: dict[str, float] = field(default_factory=dict)
    # The decoded image the masks belong to (a read-only copy): it guides their upsampling along
    # its edges (see `edges`).
    image: np.ndarray | None = field(default=None, repr=False, compare=False)
