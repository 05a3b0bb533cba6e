"""Denoising queries (DN-DETR, Li et al., CVPR 2022) for training `Sam3Model`'s decoder.

Beside the learned queries, each prompt row gets extra queries whose starting boxes are its
target objects' boxes with noise added; each must give back its own object's box and mask. No
matching is involved, so every object trains a query at its own place from the first step.

Why: in the demo model trained without them, the decoder never learned to place its queries.
Its box losses stopped falling after ~400 of 4,800 steps, and its query boxes hardly depend on
the image: each query keeps one region whatever is there. Each query's mask then covers every
object of the prompt. An object alone under its prompt is found well (oracle mask IoU 0.84),
but two or three objects under one prompt are not (0.47 and 0.32). That is most shape-only
prompts ("star" with three stars), and runs/demo-checkpoint/RESUME.md has the figures.

The denoising pass reuses the normal forward's decoder inputs and mask features (captured by
hooks in `loop.LayerCapture`), and runs the decoder's own layers on the noised boxes. Nothing of
it exists at inference: the model's classes and files stay `Sam3Model`'s.

Measured on the demo model (341 steps from its last stage): the decoder learned to refine a
given box, but no mask changed, since the mask features do not say where a pixel is (see
`criterion.position_loss`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import box_convert

from .criterion import LossWeights, box_losses, mask_losses
from .data import PromptTarget


@dataclass
class DenoisingOutput:
    """Per decoder layer boxes (L, R, K, 4) normalised xyxy and the last layer's mask logits
    (R, K, M, M) of K denoising queries per row, and each row's targets (the row's objects
    repeated once per group; queries past a row's count are padding)."""

    boxes: torch.Tensor
    masks: torch.Tensor
    targets: list[PromptTarget]


def noised_boxes(boxes: torch.Tensor, noise: float) -> torch.Tensor:
    """Normalised xyxy boxes (N, 4) moved by up to noise/2 of their size and resized by up
    to a factor 1 +- noise, as DN-DETR does; clipped to the image."""
    center, size = (boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]
    center = center + (torch.rand_like(center) * 2 - 1) * noise / 2 * size
    size = (size * (1 + (torch.rand_like(size) * 2 - 1) * noise)).clamp(min=1e-3)
    return torch.cat([center - size / 2, center + size / 2], dim=1).clamp(0.0, 1.0)


def denoising_pass(model, decoder_inputs: dict, mask_features: torch.Tensor, targets: list[PromptTarget], groups: int,
                   noise: float) -> DenoisingOutput | None:
    """Run the decoder on `groups` noised copies of every target box of every row; None when
    no row has an object. `decoder_inputs` (the decoder's keyword arguments) and `mask_features`
    come from the normal forward (`loop.LayerCapture`); call within that forward's autocast."""
    counts = [len(t.boxes) * groups for t in targets]
    width = max(counts)
    if width == 0:
        return None
    decoder = model.detr_decoder
    device = decoder_inputs["vision_features"].device
    wanted = [_repeated(t, groups) for t in targets]
    starts = torch.tensor([0.25, 0.25, 0.75, 0.75], device=device).repeat(len(targets), width, 1)  # padding: ignored by the losses
    for row, target in enumerate(wanted):
        if len(target.boxes):
            starts[row, : len(target.boxes)] = noised_boxes(torch.as_tensor(target.boxes, device=device), noise)
    # Content: learned query embeddings drawn at random, so that what the decoder learns here
    # (go to your box's object) holds for the queries it has at inference.
    content = decoder.query_embed.weight[torch.randint(len(decoder.query_embed.weight), (len(targets), width), device=device)]
    boxes, hidden = _decode(decoder, decoder_inputs, box_convert(starts, "xyxy", "cxcywh"), content)
    mask_embeddings = model.mask_decoder.mask_embedder(hidden)
    masks = torch.einsum("bqc,bchw->bqhw", mask_embeddings, mask_features)
    return DenoisingOutput(boxes, masks, wanted)


def denoising_losses(output: DenoisingOutput, weights: LossWeights) -> dict[str, torch.Tensor]:
    """Box losses on every layer (earlier layers weighted `aux`) and mask losses on the last,
    each query against the object it was made from, averaged per query."""
    boxes, masks = output.boxes.float(), output.masks.float()
    matches = [(np.arange(len(t.boxes)), np.arange(len(t.boxes))) for t in output.targets]
    count = max(1, sum(len(t.boxes) for t in output.targets))
    losses = {"denoise_box_l1": boxes.new_zeros(()), "denoise_box_giou": boxes.new_zeros(())}
    for layer in range(len(boxes)):
        scale = 1.0 if layer == len(boxes) - 1 else weights.aux
        l1, giou = box_losses(boxes[layer], output.targets, matches, count)
        losses["denoise_box_l1"] = losses["denoise_box_l1"] + scale * l1
        losses["denoise_box_giou"] = losses["denoise_box_giou"] + scale * giou
    losses["denoise_mask_focal"], losses["denoise_mask_dice"] = mask_losses(masks, output.targets, matches, count)
    return losses


def weighted_total(losses: dict[str, torch.Tensor], weights: LossWeights) -> torch.Tensor:
    """The denoising losses' share of the total: each at its plain counterpart's weight, times
    `weights.denoising`."""
    return weights.denoising * sum(getattr(weights, name.removeprefix("denoise_")) * value for name, value in losses.items())


def _decode(decoder, inputs: dict, reference: torch.Tensor, content: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`Sam3DetrDecoder.forward`'s layer loop from given starting boxes (cxcywh) and query
    contents instead of the learned ones: (per-layer xyxy boxes, last layer's normalised queries)."""
    from transformers.masking_utils import create_bidirectional_mask
    from transformers.models.sam3.modeling_sam3 import box_cxcywh_to_xyxy, inverse_sigmoid

    text, text_mask, spatial = inputs["text_features"], inputs.get("text_mask"), inputs.get("spatial_shapes")
    presence = decoder.presence_token.weight.unsqueeze(0).expand(len(content), -1, -1)
    hidden = torch.cat([presence, content.to(presence.dtype)], dim=1)
    text_attention = None
    if text_mask is not None:
        text_attention = create_bidirectional_mask(config=decoder.config, inputs_embeds=hidden, attention_mask=text_mask, encoder_hidden_states=text)
    boxes, normed = [], None
    for layer in decoder.layers:
        query_pos = decoder.ref_point_head(decoder.position_encoding.encode_boxes(reference))
        vision_attention = None
        if spatial is not None and spatial.shape[0] == 1:
            rpb = decoder._get_rpb_matrix(reference, (spatial[0, 0], spatial[0, 1]))
            vision_attention = F.pad(rpb, (0, 0, 1, 0), mode="constant", value=0)  # the presence token attends everywhere
        hidden = layer(hidden, query_pos=query_pos, text_features=text, vision_features=inputs["vision_features"],
                       vision_pos_encoding=inputs["vision_pos_encoding"], text_cross_attn_mask=text_attention, vision_cross_attn_mask=vision_attention)
        normed = decoder.output_layer_norm(hidden[:, 1:])
        refined = (decoder.box_head(normed) + inverse_sigmoid(reference)).sigmoid()
        boxes.append(box_cxcywh_to_xyxy(refined))
        reference = refined.detach()
    return torch.stack(boxes), normed


def _repeated(target: PromptTarget, groups: int) -> PromptTarget:
    return PromptTarget(target.text, np.concatenate([target.masks] * groups), np.concatenate([target.boxes] * groups))

