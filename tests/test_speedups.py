"""The per-image work done once (pixel-decoder split, first self-attention) gives the plain path's answers, on the tiny model."""

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutputWithPooling

from sam3studio import load_segmenter
from sam3studio.speedups import FirstSelfAttentionMemo, FoldedMaskHead, PixelDecoderSkips, install_complex_rope, phase_kernels, upsampled_conv


@pytest.mark.parametrize("height, width", [(6, 6), (5, 9)])
def test_four_small_convolutions_equal_a_convolution_of_the_upsampled_map(height, width):
    torch.manual_seed(0)
    x = torch.randn(2, 8, height, width)
    conv = torch.nn.Conv2d(8, 5, 3, padding=1, bias=False)
    expected = conv(F.interpolate(x, scale_factor=2, mode="nearest"))
    assert torch.allclose(upsampled_conv(x, phase_kernels(conv.weight)), expected, atol=1e-5)


def test_segmenter_outputs_match_the_plain_pixel_decoder(tiny_checkpoint, scene, monkeypatch):
    fast = load_segmenter(str(tiny_checkpoint), precision="fp32", device="cpu")
    assert fast.encode_image(scene).decoder_skips is not None
    expected_raw = fast.predict(scene, "red thing, blue thing, thing")
    monkeypatch.setattr(PixelDecoderSkips, "image_skips", lambda self, features: None)
    plain = load_segmenter(str(tiny_checkpoint), precision="fp32", device="cpu")
    assert plain.encode_image(scene).decoder_skips is None
    plain_raw = plain.predict(scene, "red thing, blue thing, thing")
    np.testing.assert_allclose(expected_raw.mask_logits, plain_raw.mask_logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(expected_raw.scores, plain_raw.scores, rtol=1e-5, atol=1e-6)


def test_outside_the_segmenter_the_decoder_runs_as_before(tiny_checkpoint):
    seg = load_segmenter(str(tiny_checkpoint), precision="fp32", device="cpu")
    decoder = seg.model.mask_decoder.pixel_decoder
    features = [torch.randn(1, decoder.out_channels, s, s) for s in (16, 8, 4)]
    with torch.no_grad():
        before = decoder.forward.__self__._original(features)
        assert torch.equal(decoder(features), before)
    assert PixelDecoderSkips.install(seg.model) is seg._pixel_decoder  # installed once per model


def test_first_self_attention_is_computed_once_per_image_and_changes_nothing(tiny_checkpoint, scene, monkeypatch):
    seg = load_segmenter(str(tiny_checkpoint), precision="fp32", device="cpu")
    memo = FirstSelfAttentionMemo.install(seg.model)
    rows_computed = []
    original = memo._original
    monkeypatch.setattr(memo, "_original", lambda **kw: rows_computed.append(kw["query"].shape[0]) or original(**kw))
    fast = seg.predict(scene, "red thing, blue thing, thing")
    seg.predict(scene, "green thing")  # a later call on the same image reuses it
    assert rows_computed == [1]
    assert seg.encode_image(scene).first_self_attention["output"].shape[0] == 1

    monkeypatch.setattr(FirstSelfAttentionMemo, "using", lambda self, slot: contextlib.nullcontext())
    plain = load_segmenter(str(tiny_checkpoint), precision="fp32", device="cpu").predict(scene, "red thing, blue thing, thing")
    np.testing.assert_allclose(fast.mask_logits, plain.mask_logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(fast.scores, plain.scores, rtol=1e-5, atol=1e-6)


def test_folded_mask_head_gives_the_plain_heads_masks_and_semantic_map(tiny_checkpoint, scene, monkeypatch):
    seg = load_segmenter(str(tiny_checkpoint), precision="fp32", device="cpu")
    encoded = seg.encode_image(scene)
    text, mask = seg._encode_texts(["red thing", "thing"], seg.default_plan)
    inputs = dict(vision_embeds=encoded.expanded(2), text_embeds=BaseModelOutputWithPooling(pooler_output=text), attention_mask=mask)
    with torch.inference_mode():
        plain = seg.model(**inputs)
        with seg._mask_head.using():
            folded = seg.model(**inputs)
    assert not torch.equal(folded.pred_masks, plain.pred_masks)  # the folded path did run
    torch.testing.assert_close(folded.pred_masks, plain.pred_masks, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(folded.semantic_seg, plain.semantic_seg, rtol=1e-4, atol=1e-4)
    assert FoldedMaskHead.install(seg.model) is seg._mask_head


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_complex_rope_rotates_exactly_as_transformers(dtype):
    from transformers.models.sam3 import modeling_sam3

    install_complex_rope()
    install_complex_rope()  # a second install keeps the first
    rotate = modeling_sam3.apply_rotary_pos_emb_2d
    original = rotate._sam3studio_original
    assert getattr(original, "_sam3studio_original", None) is None
    torch.manual_seed(0)
    qkv = torch.randn(3, 40, 2, 4, 16, dtype=dtype)  # (windows, tokens, q/k, heads, head_dim)
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)  # non-contiguous, as in the model
    angles = torch.rand(40, 8) * 20
    cos, sin = angles.cos().repeat_interleave(2, -1)[None], angles.sin().repeat_interleave(2, -1)[None]
    for fast, plain in zip(rotate(q, k, cos=cos, sin=sin), original(q, k, cos=cos, sin=sin)):
        assert fast.dtype == dtype and torch.equal(fast, plain)
    uneven = torch.rand(1, 40, 16)  # not one angle per pair: the original runs
    for fast, plain in zip(rotate(q, k, cos=uneven, sin=uneven), original(q, k, cos=uneven, sin=uneven)):
        assert torch.equal(fast, plain)
