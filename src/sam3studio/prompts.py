"""Turn what a user typed into a list of `Prompt`s, with errors a person can act on.

"person, car, blue bag" is the everyday form; "dog:0.3" gives one prompt its own threshold.
"""

from __future__ import annotations

import math
import numbers
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace

from .types import Prompt

MAX_PROMPTS = 64
# SAM3 reads 32 tokens of a prompt; far longer text is a paste gone wrong, and parsing it should
# not cost the server time it owes other requests.
MAX_PROMPT_CHARS = 500
# The text SAM3 was trained on: plain English words, digits and light punctuation.
_ENGLISH_TEXT = re.compile(r"^[A-Za-z0-9\s.,;:'\"()&/+\-!?#%]*$")
_THRESHOLD_SUFFIX = re.compile(r"^(?P<text>.*?)\s*:\s*(?P<value>[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?)\s*$")


class PromptError(ValueError):
    """A prompt list that cannot be run; the message says what to change."""


class Sam3Warning(UserWarning):
    """Something ran, but probably not the way the user meant (truncated or non-English prompt)."""


PromptsInput = str | Sequence[str | Prompt] | Mapping[str, float | None]


def parse_prompts(prompts: PromptsInput | None, *, boxes_given: bool = False) -> list[Prompt]:
    """Normalise every accepted prompt form to a de-duplicated list of `Prompt`.

    A string is split on commas; a list keeps each item whole (so "salt, pepper shaker" can be
    one prompt); a mapping is {text: threshold or None}. `boxes_given` allows an empty prompt
    list, since box exemplars alone are a valid query.
    """
    if prompts is None or (isinstance(prompts, str) and not prompts.strip()):
        items: list[Prompt] = []
    elif isinstance(prompts, str):
        items = [_parse_one(part) for part in prompts.split(",") if part.strip()]
    elif isinstance(prompts, Mapping):
        items = [_checked(Prompt(_clean_text(str(text)), _check_threshold(th, text))) for text, th in prompts.items()]
    else:
        items = [_checked(p) if isinstance(p, Prompt) else _parse_one(_require_str(p)) for p in prompts]

    items = _dedupe(items)
    if not items and not boxes_given:
        raise PromptError('No prompt given: type what to find, e.g. "person, car, blue bag".')
    if len(items) > MAX_PROMPTS:
        raise PromptError(f"{len(items)} prompts given; at most {MAX_PROMPTS} fit in one call. Split them over several calls.")
    for item in items:
        _warn_if_not_english(item.text)
    return items


def _parse_one(raw: str) -> Prompt:
    text = _check_length(raw).strip()
    threshold = None
    match = _THRESHOLD_SUFFIX.match(text)
    # "dog:0.3" (a decimal, or 0 or 1) sets a threshold; "screen 16:9" or "10:30 clock" is text.
    if match and match["text"] and ("." in match["value"] or match["value"] in ("0", "1")):
        text, threshold = match["text"], _check_threshold(float(match["value"]), raw)
    return _checked(Prompt(_clean_text(text), threshold))


def _checked(prompt: Prompt) -> Prompt:
    _check_length(prompt.text)
    if not prompt.text.strip() and not prompt.boxes:
        raise PromptError("An empty prompt was given: every prompt needs some text or a box.")
    if len(prompt.boxes) != len(prompt.box_labels) and prompt.box_labels:
        raise PromptError(f"Prompt {prompt.label!r}: {len(prompt.boxes)} boxes but {len(prompt.box_labels)} box labels.")
    _check_threshold(prompt.threshold, prompt.label)
    return prompt


def _check_length(text: str) -> str:
    if len(text) > MAX_PROMPT_CHARS:
        raise PromptError(f"A prompt of {len(text)} characters was given ({text[:40]!r}...); at most {MAX_PROMPT_CHARS} are read.")
    return text


def _clean_text(text: str) -> str:
    return " ".join(text.split())


def _require_str(item: object) -> str:
    if not isinstance(item, str):
        raise PromptError(f"Prompts must be strings, got {type(item).__name__}: {item!r}.")
    return item


def _check_threshold(value: float | None, where: object) -> float | None:
    if value is None:
        return None
    if not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise PromptError(f"Threshold {value!r} for {where!r} is not a number between 0 and 1.")
    return float(value)


def _dedupe(items: list[Prompt]) -> list[Prompt]:
    seen: set[tuple] = set()
    unique = []
    for item in items:
        key = (item.text.lower(), item.boxes, item.box_labels)
        if key not in seen:
            seen.add(key)
            unique.append(item)
    return unique


def _warn_if_not_english(text: str) -> None:
    if not _ENGLISH_TEXT.match(text):
        warnings.warn(
            f"Prompt {text!r} is not plain English: SAM3 understands English prompts only, "
            "so it will probably match nothing. Try the English words for it.",
            Sam3Warning,
            stacklevel=3,
        )


def attach_boxes(
    prompts: list[Prompt], boxes: Sequence[Sequence[float]] | None, box_labels: Sequence[int] | None = None
) -> list[Prompt]:
    """Give every text prompt the same exemplar boxes (xyxy pixels; labels 1 positive, 0
    negative), or make one box-only prompt when there is no text."""
    if boxes is None or len(boxes) == 0:
        return prompts
    checked = tuple(_check_box(box) for box in boxes)
    labels = tuple(box_labels) if box_labels is not None else (1,) * len(checked)
    if len(labels) != len(checked) or any(v not in (0, 1) for v in labels):
        raise PromptError(f"Give one label per box, each 1 (positive) or 0 (negative); got {list(labels)} for {len(checked)} boxes.")
    labels = tuple(int(v) for v in labels)
    return [Prompt(p.text, p.threshold, checked, labels) for p in (prompts or [Prompt("")])]


def _check_box(box: Sequence[float]) -> tuple[float, float, float, float]:
    try:
        values = tuple(float(v) for v in box)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 4 or not all(map(math.isfinite, values)) or not (values[0] < values[2] and values[1] < values[3]):
        raise PromptError(f"Box {box!r} is not [x0, y0, x1, y1] with x0 < x1 and y0 < y1.")
    return values  # type: ignore[return-value]


def fit_boxes_to_image(prompts: list[Prompt], height: int, width: int) -> list[Prompt]:
    """Clip every exemplar box to the image. A box reaching past the edge is common (a drag that
    left the canvas) and means "up to the edge"; one with nothing inside the image cannot show the
    model anything, and coordinates far outside overflow the model's normalised inputs."""
    return [replace(p, boxes=tuple(_clip_box(box, height, width) for box in p.boxes)) for p in prompts]


def _clip_box(box: tuple[float, float, float, float], height: int, width: int) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = min(max(box[0], 0.0), width), min(max(box[1], 0.0), height), min(box[2], width), min(box[3], height)
    if not (x0 < x1 and y0 < y1):
        raise PromptError(f"Box {list(box)} lies outside the {width}x{height} image.")
    return (x0, y0, x1, y1)
