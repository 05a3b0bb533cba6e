"""The DETR-style set criterion SAM3 is trained with: Hungarian matching of queries to target
objects, then focal classification, L1 + GIoU box, focal + dice mask, presence and dense
semantic losses. Everything here runs in fp32, whatever precision the forward pass used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torchvision.ops import box_iou, generalized_box_iou, sigmoid_focal_loss

from .data import PromptTarget


@dataclass(frozen=True)
class LossWeights:
    classification: float = 2.0
    box_l1: float = 5.0
    box_giou: float = 2.0
    mask_focal: float = 5.0
    mask_dice: float = 5.0
    presence: float = 1.0
    semantic: float = 1.0
    aux: float = 1.0  # weight of the class and box losses of the earlier decoder layers
    category: float = 0.0  # dense per-pixel category loss on the vision features (0: off)
    supercategory: float = 0.0  # the same against supercategory names ("star" for stars of any color)
    category_background: float = 1.0  # weight of background pixels within those two losses
    denoising: float = 1.0  # the denoising queries' losses (when a run has them), relative to the matched ones'
    every_name: float = 0.0  # every query scored against every name of the data (see every_name_loss); 0: off
    position: float = 0.0  # position channels (see position_loss) in the mask features, or in a dense-only step the finest vision features; 0: off


@dataclass
class Predictions:
    """All decoder layers' outputs for R prompt rows, float32.

    logits (L, R, Q); boxes (L, R, Q, 4) normalised xyxy; presence (L, R, 1);
    masks (R, Q, M, M) logits of the last layer; semantic (R, 1, M, M) logits or None;
    pixel_features (B, C, M, M): the finest vision features of the B images, for the category loss;
    mask_features (R, C, M, M): the per-pixel embeddings each query's mask embedding is dotted with;
    query_states (L, R, Q, D): each layer's query vectors, which the score head reads.
    """

    logits: torch.Tensor
    boxes: torch.Tensor
    presence: torch.Tensor
    masks: torch.Tensor
    semantic: torch.Tensor | None = None
    pixel_features: torch.Tensor | None = None
    mask_features: torch.Tensor | None = None
    query_states: torch.Tensor | None = None


def match(logits: torch.Tensor, boxes: torch.Tensor, masks: torch.Tensor | None, target: PromptTarget, weights: LossWeights) -> tuple[np.ndarray, np.ndarray]:
    """Hungarian matching of Q queries to N targets for one prompt row: (query indices,
    target indices). Costs are computed without gradients; the losses gather afterwards."""
    if len(target.boxes) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    with torch.no_grad():
        target_boxes = torch.as_tensor(target.boxes, device=boxes.device)
        prob = logits.sigmoid()
        alpha, gamma = 0.25, 2.0
        positive = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
        negative = (1 - alpha) * prob**gamma * -(1 - prob + 1e-8).log()
        cost = weights.classification * (positive - negative)[:, None]
        cost = cost + weights.box_l1 * torch.cdist(boxes, target_boxes, p=1)
        cost = cost - weights.box_giou * generalized_box_iou(boxes, target_boxes)
        if masks is not None:
            predicted = masks.sigmoid().flatten(1)
            wanted = torch.as_tensor(target.masks, device=masks.device).flatten(1)
            dice = 1 - (2 * predicted @ wanted.T + 1) / (predicted.sum(1)[:, None] + wanted.sum(1)[None] + 1)
            cost = cost + weights.mask_dice * dice
        queries, targets = linear_sum_assignment(cost.cpu().numpy())
    return queries.astype(np.int64), targets.astype(np.int64)


def set_criterion(predictions: Predictions, targets: list[PromptTarget], weights: LossWeights = LossWeights(), *,
                  quality_targets: bool = False) -> dict[str, torch.Tensor]:
    """Losses averaged per target object (DETR's normalisation); "total" is their weighted sum.

    quality_targets: train each query's score toward its IoU with the best-overlapping object of
    its prompt (`query_quality`, varifocal loss) instead of 1 for the Hungarian match and 0 for
    the rest. Why: with one-to-one targets the demo model's scores collapsed to ~0.2 for every
    query, matched or not (a sample of its training prompts: matched 0.11-0.29, best unmatched
    0.20-0.26), because near-duplicate queries make the match a coin toss the score cannot learn.
    An IoU target is the same for near-duplicates, and duplicates are removed after scoring
    (`postprocess.one_per_object`). Box and mask losses keep the Hungarian match."""
    p = Predictions(*(t.float() if t is not None else None for t in (predictions.logits, predictions.boxes, predictions.presence, predictions.masks, predictions.semantic)))
    layers, rows, queries = p.logits.shape
    device = p.logits.device
    count = max(1, sum(len(t.boxes) for t in targets))
    losses: dict[str, torch.Tensor] = {}
    for layer in range(layers):
        last = layer == layers - 1
        matches = [match(p.logits[layer, r], p.boxes[layer, r], p.masks[r] if last else None, targets[r], weights) for r in range(rows)]
        scale = 1.0 if last else weights.aux
        if quality_targets:
            cls = varifocal_loss(p.logits[layer], query_quality(p.boxes[layer], p.masks if last else None, targets)) / count
        else:
            labels = torch.zeros(rows, queries, device=device)
            for r, (q, _) in enumerate(matches):
                labels[r, q] = 1.0
            cls = sigmoid_focal_loss(p.logits[layer], labels, reduction="sum") / count
        l1, giou = box_losses(p.boxes[layer], targets, matches, count)
        _add(losses, "classification", scale * cls)
        _add(losses, "box_l1", scale * l1)
        _add(losses, "box_giou", scale * giou)
        if last:
            losses["mask_focal"], losses["mask_dice"] = mask_losses(p.masks, targets, matches, count)
    present = torch.tensor([[float(len(t.boxes) > 0)] for t in targets], device=device)
    losses["presence"] = F.binary_cross_entropy_with_logits(p.presence, present.expand_as(p.presence))
    if p.semantic is not None:
        losses["semantic"] = _semantic_loss(p.semantic, targets)
    losses["total"] = sum(getattr(weights, name) * value for name, value in losses.items())
    return losses


@torch.no_grad()
def query_quality(boxes: torch.Tensor, masks: torch.Tensor | None, targets: list[PromptTarget]) -> torch.Tensor:
    """(R, Q): each query's best IoU with an object of its prompt row, by mask where masks
    (R, Q, M, M logits) are given, else by box (R, Q, 4 xyxy); 0 throughout for a negative prompt."""
    quality = boxes.new_zeros(boxes.shape[:2])
    for r, target in enumerate(targets):
        if len(target.boxes):
            quality[r] = _best_iou(boxes[r], None if masks is None else masks[r], target)
    return quality


@torch.no_grad()
def every_name_quality(boxes: torch.Tensor, masks: torch.Tensor | None, present: list[dict[str, PromptTarget]],
                       names: list[str]) -> torch.Tensor:
    """(K, R, Q): each query's best IoU with an object of each of the K `names`, whatever its row's
    prompt was; `present[r]` holds the objects of every name present in row r's image."""
    quality = boxes.new_zeros(len(names), *boxes.shape[:2])
    for r, targets in enumerate(present):
        for name, target in targets.items():
            quality[names.index(name), r] = _best_iou(boxes[r], None if masks is None else masks[r], target)
    return quality


def _best_iou(boxes: torch.Tensor, masks: torch.Tensor | None, target: PromptTarget) -> torch.Tensor:
    """(Q,): each query's best IoU with the target's objects, by mask (Q, M, M logits) or box (Q, 4)."""
    if masks is None:
        return box_iou(boxes, torch.as_tensor(target.boxes, device=boxes.device)).amax(1)
    predicted = (masks > 0).flatten(1).float()
    wanted = (torch.as_tensor(target.masks, device=masks.device) >= 0.5).flatten(1).float()
    overlap = predicted @ wanted.T
    return (overlap / (predicted.sum(1)[:, None] + wanted.sum(1)[None] - overlap).clamp(min=1.0)).amax(1)


def every_name_loss(logits: torch.Tensor, boxes: torch.Tensor, masks: torch.Tensor, present: list[dict[str, PromptTarget]],
                    names: list[str], aux: float = 1.0) -> torch.Tensor:
    """Varifocal loss of every query scored against every name (logits (L, K, R, Q)) toward its
    IoU with that name's objects (`every_name_quality`; by box for the earlier layers, weighted
    `aux`, by mask for the last), per object counted over the names present in each row's image.

    Why: the prompt's own score (`set_criterion`) tells a query on a blue square only that it is
    not a "blue triangle" when that happens to be the prompt. The demo model answered absent
    prompts naming a color of the image with an object of another shape, and shape-only prompts
    with objects of other shapes; scoring each query against all names asks the score head to
    read the object's shape and color from every query, on every row. Measured, it did not pay:
    600 steps with it from the shipped checkpoint answered as many absent prompts as the same
    steps without it and confused shapes more often (validation F1 0.8115 against 0.8195;
    runs/demo-checkpoint/RESUME.md), so the demo recipe leaves it off."""
    layers = logits.shape[0]
    count = max(1, sum(len(t.boxes) for targets in present for t in targets.values()))
    total = logits.new_zeros(())
    for layer in range(layers):
        last = layer == layers - 1
        quality = every_name_quality(boxes[layer].float(), masks.float() if last else None, present, names)
        total = total + (1.0 if last else aux) * varifocal_loss(logits[layer].float(), quality)
    return total / count


def varifocal_loss(logits: torch.Tensor, quality: torch.Tensor, alpha: float = 0.75, gamma: float = 2.0) -> torch.Tensor:
    """VarifocalNet's loss, summed: BCE toward each query's quality in [0, 1], a query with some
    quality weighted by it, a query with none down-weighted by alpha * p^gamma as in focal loss."""
    prob = logits.sigmoid().detach()
    weight = torch.where(quality > 0, quality, alpha * prob.pow(gamma))
    return F.binary_cross_entropy_with_logits(logits, quality, weight=weight, reduction="sum")


def _add(losses: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    losses[name] = losses[name] + value if name in losses else value


def box_losses(boxes: torch.Tensor, targets, matches, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    predicted, wanted = _gather(boxes, [torch.as_tensor(t.boxes) for t in targets], matches)
    if predicted.numel() == 0:
        zero = boxes.sum() * 0.0  # keeps the graph; no matched boxes in this batch
        return zero, zero
    l1 = F.l1_loss(predicted, wanted, reduction="sum") / count
    giou = (1 - torch.diag(generalized_box_iou(predicted, wanted))).sum() / count
    return l1, giou


def mask_losses(masks: torch.Tensor, targets, matches, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    predicted, wanted = _gather(masks, [torch.as_tensor(t.masks) for t in targets], matches)
    if predicted.numel() == 0:
        zero = masks.sum() * 0.0
        return zero, zero
    predicted, wanted = predicted.flatten(1), wanted.flatten(1)
    focal = sigmoid_focal_loss(predicted, wanted, reduction="none").mean(1).sum() / count
    prob = predicted.sigmoid()
    dice = (1 - (2 * (prob * wanted).sum(1) + 1) / (prob.sum(1) + wanted.sum(1) + 1)).sum() / count
    return focal, dice


def _gather(values: torch.Tensor, target_values: list[torch.Tensor], matches) -> tuple[torch.Tensor, torch.Tensor]:
    """Matched predictions (with gradients) and their targets, concatenated over rows."""
    predicted, wanted = [], []
    for r, (q, t) in enumerate(matches):
        if len(q):
            predicted.append(values[r, torch.as_tensor(q, device=values.device)])
            wanted.append(target_values[r][torch.as_tensor(t)].to(values.device, torch.float32))
    if not predicted:
        return values.new_zeros(0), values.new_zeros(0)
    return torch.cat(predicted), torch.cat(wanted)


def _semantic_loss(semantic: torch.Tensor, targets: list[PromptTarget]) -> torch.Tensor:
    """The dense head learns the union of a prompt's masks (empty for a negative prompt)."""
    size = semantic.shape[-2:]
    union = torch.stack(
        [torch.as_tensor(t.masks).amax(0) if len(t.masks) else torch.zeros(size) for t in targets]
    ).to(semantic.device, torch.float32)[:, None]
    bce = F.binary_cross_entropy_with_logits(semantic, union)
    prob = semantic.sigmoid().flatten(1)
    flat = union.flatten(1)
    dice = (1 - (2 * (prob * flat).sum(1) + 1) / (prob.sum(1) + flat.sum(1) + 1)).mean()
    return bce + dice


POSITION_FREQUENCIES = (1, 2, 4)  # cycles per image side
POSITION_AMPLITUDE = 0.25  # about the mean magnitude of the demo model's mask features


def position_targets(size: int, device=None) -> torch.Tensor:
    """(4 * F, size, size): sin and cos of x and of y at each of F frequencies (pixel centres
    in [0, 1]), times POSITION_AMPLITUDE."""
    centres = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size
    waves = []
    for frequency in POSITION_FREQUENCIES:
        angle = 2 * math.pi * frequency * centres
        for wave in (torch.sin(angle), torch.cos(angle)):
            waves += [wave[None, :].expand(size, size), wave[:, None].expand(size, size)]  # along x, along y
    return POSITION_AMPLITUDE * torch.stack(waves)


def position_loss(mask_features: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the first 4 * F channels of the mask features (R, C, M, M),
    each pixel's vector scaled to length 1, and `position_targets`.

    Why: a query's mask is its embedding dotted with these features, so it can only single out
    one of two like objects if the features say where each pixel is. In the demo model trained
    without this loss they hardly do (a linear read-out of x and y from them: R^2 below 0 on
    unseen images), and a prompt with several objects got one mask over all of them from every
    query. Fixed channels need no extra head, and the mask embedder can weigh them directly.
    It needs the position in the ViT to begin with. Turned on in the trained model's last stage,
    it emptied the channels rather than filled them (a separation stage, since dropped): that
    ViT had lost the position in its first layer. From scratch with transformers' position
    table (std 0.02), it barely moved in 600 encoder steps. From `presets.sincos_position_embeddings`
    it fell from the all-zero level (0.031) to 0.0135 in 400 steps. The features are compared at
    length 1 because fresh ones have a scale of ~0.001, 250x below the targets', and only this
    loss would ask for more. runs/demo-checkpoint/RESUME.md has the figures."""
    wanted = position_targets(mask_features.shape[-1], mask_features.device)
    unit = F.normalize(mask_features.float(), dim=1)
    return F.mse_loss(unit[:, : len(wanted)], wanted.expand(len(mask_features), -1, -1, -1))


def category_loss(logits: torch.Tensor, labels: torch.Tensor, background_weight: float = 1.0) -> torch.Tensor:
    """Cross-entropy of per-pixel category logits (B, K+1, M, M) against labels (B, M, M),
    background (class 0) weighted `background_weight`: most pixels are background, and at full
    weight they are most of what the features learn.

    Why: the vision encoder otherwise learns only through the prompt-conditioned heads, one
    matched query at a time; telling it directly which pixels are which category (scored
    against the text of each category name, see `loop.CategoryHead`) gives it features the
    text can select from, and the text features something to select with."""
    weight = None  # at 1.0, exactly the unweighted loss the shipped recipe trained with
    if background_weight != 1.0:
        weight = torch.ones(logits.shape[1], device=logits.device)
        weight[0] = background_weight
    return F.cross_entropy(logits.float(), labels.to(logits.device), weight=weight)
