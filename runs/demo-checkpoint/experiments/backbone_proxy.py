"""How fast does a vision backbone learn which shape and color each pixel belongs to?

A proxy for the demo model's weak point (shape-only prompts): train a SAM3 vision encoder (or a
small CNN, for comparison) with a 1x1 per-pixel head on the 24 "<color> <shape>" categories of
the shapes data, then report on object pixels of a validation set how often the predicted
category has the right shape and the right color (chance: 0.25 and 0.17). Background pixels
weigh 0.1 in the loss, or the head learns background only.

    python backbone_proxy.py --variant base --steps 1500 --train /tmp/shapes/train --val /tmp/shapes/val

Variants: base (the demo architecture's encoder: 336 px, 14 px patches, 4 layers, width 112),
p7 (7 px patches, FPN scales 2/1/0.5 so masks stay 96x96), d6 (6 layers), cnn (8 conv layers).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from sam3studio.train.data import CocoSegmentationData
from sam3studio.train.presets import SPECIAL_TOKENS, clip_tokenizer, demo_architecture
from sam3studio.train.shapes import COLORS, write_dataset

IMAGE_SIZE, WIDTH, CLASSES = 336, 112, 25
VAL_SCENES = 100


class SmallCnn(torch.nn.Module):
    def __init__(self):
        super().__init__()

        def block(cin: int, cout: int, stride: int):
            return torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 3, stride, 1), torch.nn.BatchNorm2d(cout), torch.nn.ReLU())

        strides = [(3, 32, 2), (32, 64, 2), (64, WIDTH, 2), (WIDTH, WIDTH, 1), (WIDTH, WIDTH, 2), (WIDTH, WIDTH, 1), (WIDTH, WIDTH, 2), (WIDTH, WIDTH, 1)]
        self.net = torch.nn.Sequential(*(block(*s) for s in strides))

    def forward(self, pixels):
        features = torch.nn.functional.interpolate(self.net(pixels), size=(96, 96), mode="bilinear")
        return SimpleNamespace(fpn_hidden_states=[features])


def backbone(variant: str) -> torch.nn.Module:
    from transformers import Sam3VisionModel

    if variant == "cnn":
        return SmallCnn()
    tokenizer = clip_tokenizer()
    bos, eos = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    config = demo_architecture(len(tokenizer), bos, eos, IMAGE_SIZE).vision_config
    vit = config.backbone_config
    if variant == "p7":
        vit.patch_size, config.scale_factors = 7, [2.0, 1.0, 0.5, 0.5]
    if variant == "d6":
        vit.num_hidden_layers, vit.global_attn_indexes = 6, [1, 3, 5]
    vit.window_size = IMAGE_SIZE // vit.patch_size // 3
    return Sam3VisionModel(config)


def batch(data: CocoSegmentationData, indices, rng, mask_size: int):
    samples = [data.sample(int(i), rng, input_size=IMAGE_SIZE, mask_size=mask_size, mean=[0.5] * 3, std=[0.5] * 3) for i in indices]
    return torch.from_numpy(np.stack([s.pixels for s in samples])), torch.from_numpy(np.stack([s.categories for s in samples]))


def right_shape_and_color(predicted: torch.Tensor, truth: torch.Tensor) -> tuple[int, int]:
    """How many predicted categories have the true one's shape, and how many its color. Both hold
    category numbers minus one, which run shape-major (shape * colors + color); -1 is background."""
    colors, found = len(COLORS), predicted >= 0
    shapes_right = ((predicted // colors == truth // colors) & found).sum().item()
    colors_right = ((predicted % colors == truth % colors) & found).sum().item()
    return int(shapes_right), int(colors_right)


def accuracy(forward, model: torch.nn.Module, val: CocoSegmentationData, mask_size: int) -> dict[str, float]:
    """Shape and color accuracy of the predicted category on the object pixels of the first
    VAL_SCENES validation scenes."""
    model.eval()
    shape_right = color_right = pixels_seen = 0
    with torch.no_grad():
        for start in range(0, min(VAL_SCENES, len(val)), 10):
            pixels, labels = batch(val, range(start, min(start + 10, len(val))), np.random.default_rng(start), mask_size)
            predicted = forward(pixels).argmax(1)
            on_object = labels > 0
            p, t = predicted[on_object] - 1, labels[on_object] - 1
            shapes, colors = right_shape_and_color(p, t)
            shape_right += shapes
            color_right += colors
            pixels_seen += len(t)
    return {"shape_accuracy": round(shape_right / pixels_seen, 3), "color_accuracy": round(color_right / pixels_seen, 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", default="base", choices=["base", "p7", "d6", "cnn"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (fast only on CPUs with native bf16)")
    parser.add_argument("--train", default="/tmp/shapes/train")
    parser.add_argument("--val", default="/tmp/shapes/val")
    parser.add_argument("--train-scenes", type=int, default=1500, help="scenes rendered when --train is empty")
    parser.add_argument("--eval-every", type=int, default=0, help="also report accuracy every N steps")
    args = parser.parse_args()
    for folder, count, seed in ((args.train, args.train_scenes, 101), (args.val, VAL_SCENES, 202)):
        if not (Path(folder) / "annotations.json").is_file():
            write_dataset(folder, count, seed)
    torch.manual_seed(0)
    model, head = backbone(args.variant), torch.nn.Conv2d(WIDTH, CLASSES, 1)
    params = [*model.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + np.cos(np.pi * min(1.0, s / args.steps))))
    class_weights = torch.ones(CLASSES)
    class_weights[0] = 0.1
    train, val = CocoSegmentationData(args.train), CocoSegmentationData(args.val)
    with torch.no_grad():
        mask_size = model(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)).fpn_hidden_states[0].shape[-1]

    def forward(pixels):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            return head(model(pixels).fpn_hidden_states[0]).float()

    training_seconds = 0.0
    for step in range(args.steps):
        started = time.perf_counter()
        rng = np.random.default_rng([0, step])
        pixels, labels = batch(train, rng.choice(len(train), 8), rng, mask_size)
        loss = torch.nn.functional.cross_entropy(forward(pixels), labels, weight=class_weights)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        training_seconds += time.perf_counter() - started
        if step % 100 == 0:
            print(step, round(loss.item(), 3), flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            print(json.dumps({"step": step + 1, **accuracy(forward, model, val, mask_size)}), flush=True)
            model.train()
    print(json.dumps({"variant": args.variant, "steps": args.steps, "lr": args.lr, "seconds_per_step": round(training_seconds / args.steps, 2),
                      **accuracy(forward, model, val, mask_size)}))


if __name__ == "__main__":
    main()
