"""How much a demo checkpoint's features know where each pixel is, stage by stage.

    python position_probe.py CHECKPOINT --val /work/runs/demo6/data/val --scenes 8

For each stage (the ViT's input, after position embeddings; each ViT layer; the DETR encoder;
the mask features each query's mask embedding is dotted with), fits a linear read-out of the
pixel's x and y (least squares, pooled to 30x30) on the first half of the scenes and prints its
R^2 on the other half. A query can single out one of two like objects only through features
that say where they are: near 0 or below, they do not.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from transformers import Sam3Model, Sam3Processor

from sam3studio.precision import resolve
from sam3studio.train.data import CocoSegmentationData
from sam3studio.train.loop import forward_batch

GRID = 30


def stage_features(model, processor, data: CocoSegmentationData, scenes: int) -> dict[str, list[torch.Tensor]]:
    """Per stage, each scene's features as (C, GRID, GRID)."""
    kept: dict[str, torch.Tensor] = {}
    backbone = model.vision_encoder.backbone

    def keep(name):
        return lambda module, args, output: kept.__setitem__(name, output[0] if isinstance(output, tuple) else output)

    hooks = [backbone.embeddings.register_forward_hook(keep("ViT input (patches + position)"))]
    hooks += [layer.register_forward_hook(keep(f"ViT layer {i}")) for i, layer in enumerate(backbone.layers)]
    hooks.append(model.detr_encoder.register_forward_hook(lambda module, args, output: kept.__setitem__("DETR encoder", output.last_hidden_state)))
    images = processor.image_processor
    found: dict[str, list[torch.Tensor]] = {}
    try:
        for index in range(scenes):
            sample = data.sample(index, np.random.default_rng(index), input_size=images.size["height"], mask_size=images.mask_size["height"],
                                 mean=images.image_mean, std=images.image_std, flip=False)
            with torch.no_grad():
                predictions, _, _ = forward_batch(model, processor.tokenizer, [sample], resolve("fp32", "cpu"))
            kept["finest vision features (FPN)"] = predictions.pixel_features
            kept["mask features"] = predictions.mask_features
            for name, tensor in kept.items():
                found.setdefault(name, []).append(_as_grid(tensor[:1].float()))
    finally:
        for hook in hooks:
            hook.remove()
    return found


def _as_grid(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dim() == 3:  # (1, tokens, C): the image's tokens first
        side = int(round(tensor.shape[1] ** 0.5))
        tensor = tensor[:, : side * side].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    elif tensor.shape[-1] != tensor.shape[-2]:  # (1, H, W, C), the ViT's layout
        tensor = tensor.permute(0, 3, 1, 2)
    return torch.nn.functional.adaptive_avg_pool2d(tensor, GRID)[0]


def held_out_r2(grids: list[torch.Tensor]) -> np.ndarray:
    """R^2 of x and y, read out linearly, fitted on the first half of the scenes."""
    centres = (np.arange(GRID) + 0.5) / GRID
    ys, xs = np.meshgrid(centres, centres, indexing="ij")
    where = np.stack([xs.ravel(), ys.ravel()], 1)
    half = len(grids) // 2
    design = [np.c_[g.reshape(len(g), -1).T.numpy(), np.ones(GRID * GRID)] for g in grids]
    weights, *_ = np.linalg.lstsq(np.concatenate(design[:half]), np.tile(where, (half, 1)), rcond=None)
    predicted = np.concatenate(design[half:]) @ weights
    wanted = np.tile(where, (len(grids) - half, 1))
    return 1 - ((predicted - wanted) ** 2).sum(0) / ((wanted - wanted.mean(0)) ** 2).sum(0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--val", default="/work/runs/demo6/data/val")
    parser.add_argument("--scenes", type=int, default=8)
    args = parser.parse_args()
    model = Sam3Model.from_pretrained(args.checkpoint, use_safetensors=True).eval()
    processor = Sam3Processor.from_pretrained(args.checkpoint)
    for name, grids in stage_features(model, processor, CocoSegmentationData(args.val), args.scenes).items():
        r2 = held_out_r2(grids)
        print(f"{name:32s} R^2 of x {r2[0]:6.3f}, of y {r2[1]:6.3f}")


if __name__ == "__main__":
    main()
