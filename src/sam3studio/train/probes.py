"""What a trained checkpoint's vision features know, read through the per-pixel category head it
was trained with (`loop.Trainer.category_logits`). A diagnostic for recipes on names of two
words such as the shapes data's "<color> <shape>": the demo model's scores confused shapes, not
colors, and this says whether the features already do (runs/demo-checkpoint/RESUME.md).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from .data import TrainingSample


def pixel_name_accuracy(checkpoint: str | Path, data: str | Path, *, image_size: int | None = None) -> dict[str, float | int]:
    """Read the category head over every image of the COCO dataset `data` (at mask resolution,
    no flips). Per object pixel: the share whose category it names right ("name"), and the
    shares whose named category has the right first word ("first_word": the color in the shapes
    data) and last word ("last_word": the shape). Per object, by the majority of its visible
    pixels' last words: the share named right ("object_last_word"), and that share among the
    objects smaller than the median ("small_object_last_word"), since a pixel share hides the
    small objects behind the large ones' many pixels. `image_size`: the input size to read at;
    None, the checkpoint's. The counts ("pixels", "objects") are ints, the shares floats."""
    from .criterion import LossWeights
    from .loop import CATEGORY_HEAD_FILE, TrainConfig, Trainer, load_for_training

    if not (Path(checkpoint) / CATEGORY_HEAD_FILE).is_file():
        raise FileNotFoundError(f"{checkpoint}: no {CATEGORY_HEAD_FILE}; only a checkpoint trained with the category loss has a head to read.")
    with tempfile.TemporaryDirectory() as unused_out:  # a Trainer needs a run folder; nothing is written to it
        config = TrainConfig(data=str(data), out=unused_out, model=str(checkpoint), weights=LossWeights(category=1.0), image_size=image_size, precision="fp32")
        trainer = Trainer(config, *load_for_training(config))
    trainer.model.eval()
    names = [""] + [trainer.data.categories[cid]["name"] for cid in sorted(trainer.data.category_number)]  # by category number; 0 background
    first, last = np.array([n.split()[0] if n else "" for n in names]), np.array([n.split()[-1] if n else "" for n in names])
    processor = trainer.processor.image_processor
    rng = np.random.default_rng(0)
    right, pixels, objects = np.zeros(3), 0, []  # objects: (visible pixels, majority last word right)
    with torch.no_grad():
        for index in range(len(trainer.data)):
            sample = trainer.data.sample(index, rng, input_size=processor.size["height"], mask_size=processor.mask_size["height"],
                                         mean=processor.image_mean, std=processor.image_std, flip=False)
            features = trainer.model.get_vision_features(pixel_values=torch.from_numpy(sample.pixels[None])).fpn_hidden_states[0]
            named = trainer.category_logits(features, "category").argmax(1)[0].numpy()
            wanted, got = sample.categories[sample.categories > 0], named[sample.categories > 0]
            right += ((wanted == got).sum(), (first[wanted] == first[got]).sum(), (last[wanted] == last[got]).sum())
            pixels += len(wanted)
            objects += _objects_named(sample, named, names, last)
    shares = right / max(1, pixels)
    sizes, named_right = np.array(objects, dtype=np.float64).reshape(-1, 2).T
    small = sizes < np.median(sizes) if len(sizes) else sizes.astype(bool)
    return {"name": float(shares[0]), "first_word": float(shares[1]), "last_word": float(shares[2]), "pixels": pixels,
            "object_last_word": float(named_right.mean()) if len(sizes) else 0.0,
            "small_object_last_word": float(named_right[small].mean()) if small.any() else 0.0, "objects": len(sizes)}


def _objects_named(sample: TrainingSample, named: np.ndarray, names: list[str], last: np.ndarray) -> list[tuple[int, bool]]:
    """(visible pixels, whether most of them name the object's last word) for each object of a
    sample, read from the prompts that are category names (whose masks are one object each). A
    tie goes to the word first in alphabetical order."""
    objects = []
    for prompt in sample.prompts:
        if prompt.text not in names[1:]:
            continue
        wanted = last[names.index(prompt.text)]
        for mask in prompt.masks:
            visible = mask > 0.5  # masks are area fractions; overlapped parts are already cut away
            if visible.any():
                words, counts = np.unique(last[named[visible]], return_counts=True)
                objects.append((int(visible.sum()), bool(words[counts.argmax()] == wanted)))
    return objects
