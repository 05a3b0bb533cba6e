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


def pixel_name_accuracy(checkpoint: str | Path, data: str | Path, *, image_size: int | None = None) -> dict[str, float]:
    """Over the object pixels of every image of the COCO dataset `data` (at mask resolution, no
    flips): the share whose category the head names right ("name"), and the shares whose named
    category has the right first word ("first_word": the color in the shapes data) and last word
    ("last_word": the shape). `image_size`: the input size to read at; None, the checkpoint's."""
    from .criterion import LossWeights
    from .loop import CATEGORY_HEAD_FILE, TrainConfig, Trainer, load_for_training

    if not (Path(checkpoint) / CATEGORY_HEAD_FILE).is_file():
        raise FileNotFoundError(f"{checkpoint}: no {CATEGORY_HEAD_FILE}; only a checkpoint trained with the category loss has a head to read.")
    with tempfile.TemporaryDirectory() as unused_out:  # a Trainer needs a run folder; nothing is written to it
        config = TrainConfig(data=str(data), out=unused_out, model=str(checkpoint), weights=LossWeights(category=1.0), image_size=image_size, precision="fp32")
        trainer = Trainer(config, *load_for_training(config))
    trainer.model.eval()
    words = [[""]] + [trainer.data.categories[cid]["name"].split() for cid in sorted(trainer.data.category_number)]  # by category number; 0 background
    first, last = np.array([w[0] for w in words]), np.array([w[-1] for w in words])
    processor = trainer.processor.image_processor
    rng = np.random.default_rng(0)
    right, pixels = np.zeros(3), 0
    with torch.no_grad():
        for index in range(len(trainer.data)):
            sample = trainer.data.sample(index, rng, input_size=processor.size["height"], mask_size=processor.mask_size["height"],
                                         mean=processor.image_mean, std=processor.image_std, flip=False)
            features = trainer.model.get_vision_features(pixel_values=torch.from_numpy(sample.pixels[None])).fpn_hidden_states[0]
            named = trainer.category_logits(features, "category").argmax(1)[0].numpy()
            wanted, got = sample.categories[sample.categories > 0], named[sample.categories > 0]
            right += ((wanted == got).sum(), (first[wanted] == first[got]).sum(), (last[wanted] == last[got]).sum())
            pixels += len(wanted)
    shares = right / max(1, pixels)
    return {"name": float(shares[0]), "first_word": float(shares[1]), "last_word": float(shares[2]), "pixels": pixels}
