"""Work on SAM3's prompt path that depends on the image alone, done once per image instead of
once per prompt.

SAM3's pixel decoder takes the prompt-conditioned encoder output (72x72 at full size) up to the
mask resolution in two steps; each step upsamples 2x (nearest), adds a backbone feature map of
the image and applies a 3x3 convolution, then GroupNorm and ReLU. A convolution is linear, so
conv(up(x) + f) = conv(up(x)) + conv(f):

- conv(f) depends on the image only, so it is computed once, with the image's encoding;
- a 3x3 convolution of a 2x nearest-upsampled map equals four 2x2 convolutions at the low
  resolution, one per output phase: 16 multiply-adds per pixel and channel pair instead of 36.

At full size the 288x288 step dominates the pixel decoder; per prompt it gets ~2.7x faster.
The results equal the original's up to float rounding (tests compare the two). Training uses the
same split with gradients (`training_skips`): skip convolutions once per image of the batch,
phase kernels recomputed from the current weights at every step.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

# Which 3x3 taps fall on the same low-resolution row (or column), for output phase 0 and 1:
# phase 0 reads rows i-1 (tap 0) and i (taps 1, 2); phase 1 reads rows i (taps 0, 1) and i+1 (tap 2).
_TAPS = {0: ([0], [1, 2]), 1: ([0, 1], [2])}


def phase_kernels(weight: torch.Tensor) -> dict[tuple[int, int], torch.Tensor]:
    """The four 2x2 kernels (out, in, 2, 2) that apply `weight` (out, in, 3, 3) to a 2x
    nearest-upsampled input, one per output phase (row parity, column parity)."""
    w = weight.float()
    kernels = {}
    for a in (0, 1):
        for b in (0, 1):
            rows = [torch.stack([w[:, :, r][:, :, :, c].sum((2, 3)) for c in _TAPS[b]], -1) for r in _TAPS[a]]
            kernels[a, b] = torch.stack(rows, -2).to(weight.dtype)
    return kernels


def upsampled_conv(x: torch.Tensor, kernels: dict[tuple[int, int], torch.Tensor]) -> torch.Tensor:
    """conv3x3(nearest_upsample_2x(x)) with padding 1 and no bias, computed at x's resolution."""
    batch, _, height, width = x.shape
    parts = {}
    for (a, b), kernel in kernels.items():
        # Padding makes phase (a, b) read rows i-1+a..i+a; the kernel follows x's dtype outside
        # autocast (half weights upcast for an fp32 fallback pass), autocast casts both inside it.
        parts[a, b] = F.conv2d(F.pad(x, (1 - b, b, 1 - a, a)), kernel.to(x.dtype))
    out = parts[0, 0].new_empty(batch, parts[0, 0].shape[1], 2 * height, 2 * width)
    for (a, b), part in parts.items():
        out[:, :, a::2, b::2] = part
    return out


class PixelDecoderSkips:
    """The split computation, installed on a model's pixel decoder. Outside `using(...)` the
    decoder runs exactly as before (training, other callers)."""

    def __init__(self, decoder: nn.Module):
        self.decoder = decoder
        self._skips: tuple[torch.Tensor, ...] | None = None
        self._original = decoder.forward
        decoder.forward = self._forward

    @classmethod
    def install(cls, model: nn.Module) -> PixelDecoderSkips:
        """Once per model: a second Segmenter over the same model shares the first one's."""
        decoder = model.mask_decoder.pixel_decoder
        if not isinstance(getattr(decoder, "_sam3studio_skips", None), cls):
            decoder._sam3studio_skips = cls(decoder)
        return decoder._sam3studio_skips

    @functools.cached_property
    def _kernels(self) -> list[dict[tuple[int, int], torch.Tensor]]:
        # Weights are fixed at inference; computed on first use, after any dtype cast.
        return [phase_kernels(conv.weight.detach()) for conv in self.decoder.conv_layers]

    def image_skips(self, backbone_features: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
        """conv_i(f_i) + bias for each upsampling step, from one image's backbone features
        (batch 1, finest first, as `Sam3Model` passes them). None when the levels are not
        exact 2x steps (then the plain path runs)."""
        with torch.inference_mode():
            return self._skip_convolutions(backbone_features)

    def training_skips(self, backbone_features: tuple[torch.Tensor, ...], rows: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """`image_skips` with gradients, for a batch of images whose prompt rows come from
        image `rows[r]`: each image's skip convolutions run once, then are shared by its rows."""
        skips = self._skip_convolutions(backbone_features)
        return None if skips is None else tuple(skip[rows] for skip in skips)

    def _skip_convolutions(self, backbone_features: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
        levels = list(reversed(backbone_features[:-1]))  # coarse to fine, the decoder's order
        sizes = [tuple(backbone_features[-1].shape[-2:])] + [tuple(f.shape[-2:]) for f in levels]
        if any(fine != (2 * coarse[0], 2 * coarse[1]) for coarse, fine in zip(sizes, sizes[1:])):
            return None
        return tuple(conv(f) for conv, f in zip(self.decoder.conv_layers, levels))

    @contextlib.contextmanager
    def using(self, skips: tuple[torch.Tensor, ...] | None) -> Iterator[None]:
        self._skips = skips
        try:
            yield
        finally:
            self._skips = None

    def _forward(self, backbone_features: list[torch.Tensor]) -> torch.Tensor:
        if self._skips is None:
            return self._original(backbone_features)
        x = backbone_features[-1]
        # While training the weights change every step: kernels from the live weights, with gradients.
        training = self.decoder.training and torch.is_grad_enabled()
        kernels = [phase_kernels(c.weight) for c in self.decoder.conv_layers] if training else self._kernels
        for index, skip in enumerate(self._skips):
            x = upsampled_conv(x, kernels[index]) + skip
            x = F.relu(self.decoder.norms[index](x))
        return x


class FirstSelfAttentionMemo:
    """The DETR encoder's first layer starts with self-attention over the image tokens, before
    any cross-attention to the prompt: its output depends on the image alone. At full size it
    is attention over 5,184 tokens, one of the six such in every prompt's pass. It is computed
    once per image (for one row of the first pass), kept with the image's encoding and reused
    by every later prompt. Outside `using(...)` the layer runs as before."""

    def __init__(self, attention: nn.Module):
        self._original = attention.forward
        self._slot: dict | None = None
        attention.forward = self._forward

    @classmethod
    def install(cls, model: nn.Module) -> FirstSelfAttentionMemo:
        attention = model.detr_encoder.layers[0].self_attn
        if not isinstance(getattr(attention, "_sam3studio_memo", None), cls):
            attention._sam3studio_memo = cls(attention)
        return attention._sam3studio_memo

    @contextlib.contextmanager
    def using(self, slot: dict) -> Iterator[None]:
        """Within: every row is the same image, and `slot` holds (or receives) its output."""
        self._slot = slot
        try:
            yield
        finally:
            self._slot = None

    def _forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs):
        if self._slot is None:
            return self._original(query=query, key=key, value=value, **kwargs)
        if "output" not in self._slot:
            self._slot["output"] = self._original(query=query[:1], key=key[:1], value=value[:1], **kwargs)[0]
        output = self._slot["output"]
        return output.expand(query.shape[0], *output.shape[1:]), None


class FoldedMaskHead:
    """SAM3's mask head projects the 288x288 pixel embedding with a 1x1 convolution (256 to
    256 channels at full size) and then takes each query's dot product with it. Both steps are
    linear, so the projection folds into the queries instead: (m W) . x + m . b for query
    embedding m. That turns a 21 M x 256 x 256 convolution into a 200 x 256 x 256 product, per
    prompt. The semantic head (a 1x1 convolution to one channel) rides along as one more row.

    Inside `using()` the mask decoder also skips `_embed_pixels`' copies of the backbone maps,
    which the pixel decoder reads but never changes. Outside it the decoder runs as before."""

    def __init__(self, decoder: nn.Module):
        self.decoder = decoder
        self._original = decoder.forward
        self._active = False
        decoder.forward = self._forward

    @classmethod
    def install(cls, model: nn.Module) -> FoldedMaskHead:
        decoder = model.mask_decoder
        if not isinstance(getattr(decoder, "_sam3studio_fold", None), cls):
            decoder._sam3studio_fold = cls(decoder)
        return decoder._sam3studio_fold

    @contextlib.contextmanager
    def using(self) -> Iterator[None]:
        self._active = True
        try:
            yield
        finally:
            self._active = False

    def _forward(self, decoder_queries, backbone_features, encoder_hidden_states, prompt_features=None, prompt_mask=None, **kwargs):
        if not self._active:
            return self._original(decoder_queries=decoder_queries, backbone_features=backbone_features,
                                  encoder_hidden_states=encoder_hidden_states, prompt_features=prompt_features,
                                  prompt_mask=prompt_mask, **kwargs)
        from transformers.models.sam3.modeling_sam3 import Sam3MaskDecoderOutput

        d = self.decoder
        if prompt_features is not None:
            encoder_hidden_states = encoder_hidden_states + self._prompt_attention(encoder_hidden_states, prompt_features, prompt_mask)
        height, width = backbone_features[-1].shape[-2:]
        batch, _, channels = encoder_hidden_states.shape
        tokens = encoder_hidden_states[:, : height * width].transpose(1, 2).reshape(batch, channels, height, width)
        pixels = d.pixel_decoder([*backbone_features[:-1], tokens])

        queries = d.mask_embedder(decoder_queries)  # (B, Q, C)
        projection, semantic = d.instance_projection, d.semantic_projection
        rows = torch.cat([queries @ projection.weight.flatten(1), semantic.weight.flatten(1).expand(batch, 1, -1)], dim=1)
        offsets = torch.cat([queries @ projection.bias, semantic.bias.expand(batch, 1)], dim=1)
        maps = torch.einsum("bqc,bchw->bqhw", rows, pixels) + offsets[..., None, None]
        return Sam3MaskDecoderOutput(pred_masks=maps[:, :-1], semantic_seg=maps[:, -1:])

    def _prompt_attention(self, hidden: torch.Tensor, prompt_features: torch.Tensor, prompt_mask: torch.Tensor | None) -> torch.Tensor:
        """The decoder's cross-attention from image tokens to the prompt, as `Sam3MaskDecoder` runs it."""
        from transformers.masking_utils import create_bidirectional_mask

        d = self.decoder
        normed = d.prompt_cross_attn_norm(hidden)
        mask = None
        if prompt_mask is not None:
            mask = create_bidirectional_mask(config=d.config, inputs_embeds=normed, encoder_hidden_states=prompt_features, attention_mask=prompt_mask)
        output, _ = d.prompt_cross_attn(query=normed, key=prompt_features, value=prompt_features, attention_mask=mask)
        return output


def install_complex_rope() -> None:
    """SAM3's ViT rotates each (even, odd) pair of query and key channels by a position angle,
    in fp32, through `apply_rotary_pos_emb_2d`: an upcast, a stacked copy for the rotation,
    two products and a sum, each a pass over the tensor. The same rotation is one complex
    product per pair. At full size that runs 7x faster (65 -> 9 ms per windowed layer in bf16,
    32 layers per image) and gives bit-identical results (tests compare the two). Installed
    once, for every SAM3 model in the process; other rotations fall back to the original."""
    from transformers.models.sam3 import modeling_sam3

    if getattr(modeling_sam3.apply_rotary_pos_emb_2d, "_sam3studio_original", None) is None:
        original = modeling_sam3.apply_rotary_pos_emb_2d
        rotate = functools.wraps(original)(functools.partial(_complex_rope, original))
        rotate._sam3studio_original = original
        modeling_sam3.apply_rotary_pos_emb_2d = rotate


def _complex_rope(original, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cos_pairs, sin_pairs = cos[..., 0::2], sin[..., 0::2]
    if q.shape[-1] % 2 or not (torch.equal(cos_pairs, cos[..., 1::2]) and torch.equal(sin_pairs, sin[..., 1::2])):
        return original(q, k, cos=cos, sin=sin)  # not one angle per channel pair
    turn = torch.complex(cos_pairs.float(), sin_pairs.float())

    def rotated(x: torch.Tensor) -> torch.Tensor:
        pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
        return torch.view_as_real(pairs * turn).flatten(-2).to(x.dtype)

    return rotated(q), rotated(k)
