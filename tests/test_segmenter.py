import threading
import warnings

import numpy as np
import pytest
import torch

from sam3studio import PrecisionError, PromptError, Sam3Warning, load_segmenter
from sam3studio.postprocess import select


def test_segment_returns_masks_in_image_pixels(segmenter, scene):
    result = segmenter.segment(scene, "red square, blue square", threshold=0.0)
    assert result.image_size == (90, 130)
    assert result.instances, "threshold 0 keeps every query with a non-empty mask"
    for inst in result.instances:
        assert inst.mask.shape == (90, 130) and inst.mask.dtype == bool
        x0, y0, x1, y1 = inst.box
        assert 0 <= x0 < x1 <= 130 and 0 <= y0 < y1 <= 90
        assert inst.label in ("red square", "blue square")
    order = [(i.prompt_index, -i.score) for i in result.instances]
    assert order == sorted(order), "prompt order, then score descending"
    assert result.precision_requested == "fp32" and result.precision_used == "fp32" and not result.fallback_fp32
    assert {"encode_image", "encode_text", "detect", "total"} <= result.timings_ms.keys()


def test_threshold_filters_by_score(segmenter, scene):
    raw = segmenter.predict(scene, "red square")
    cut = float(np.median(raw.scores[0]))
    kept = select(raw, threshold=cut)
    assert all(i.score >= cut for i in kept.instances)
    assert len(kept.instances) <= int((raw.scores[0] >= cut).sum())
    assert len(select(raw, threshold=1.0).instances) == 0


def test_per_prompt_threshold_overrides_the_call(fresh_segmenter, scene):
    result = fresh_segmenter.segment(scene, "red square:0.0, blue square", threshold=1.0)
    assert result.instances and {i.label for i in result.instances} == {"red square"}
    moved = fresh_segmenter.segment(scene, "red square:1.0, blue square:0.0", threshold=1.0)
    assert moved.instances and {i.label for i in moved.instances} == {"blue square"}
    assert fresh_segmenter.counters["forward_passes"] == 1, "thresholds are post-processing only"


def test_image_encoded_once_across_prompts(fresh_segmenter, scene):
    seg = fresh_segmenter
    seg.segment(scene, "red square")
    seg.segment(scene, "blue square")
    seg.segment(scene.copy(), "red square, blue square")
    assert seg.counters["image_encodings"] == 1
    assert seg.counters["text_encodings"] == 2, "each text is embedded once"
    seg.segment(scene[:, ::-1], "red square")
    assert seg.counters["image_encodings"] == 2, "different content, new encoding"


def test_threshold_and_refinement_changes_reuse_model_outputs(fresh_segmenter, scene):
    seg = fresh_segmenter
    seg.segment(scene, "red square", threshold=0.1)
    passes = seg.counters["forward_passes"]
    for threshold, refine in ((0.2, 0), (0.0, 1), (0.3, 3)):
        seg.segment(scene, "red square", threshold=threshold, refine=refine)
    assert seg.counters["forward_passes"] == passes


def test_batched_prompts_match_one_by_one(segmenter, fresh_segmenter, scene):
    prompts = ["red square", "blue square", "a small dog", "background"]
    batched = segmenter.predict(scene, prompts)
    for index, text in enumerate(prompts):
        single = fresh_segmenter.predict(scene, [text])
        np.testing.assert_allclose(single.scores[0], batched.scores[index], atol=1e-5)
        np.testing.assert_allclose(single.mask_logits[0], batched.mask_logits[index], atol=1e-4)
        np.testing.assert_allclose(single.boxes[0], batched.boxes[index], atol=1e-3)


def test_bf16_agrees_with_fp32(tiny_checkpoint, segmenter, scene):
    bf16 = load_segmenter(str(tiny_checkpoint), precision="bf16", force_precision=True, device="cpu")
    ref, low = segmenter.predict(scene, "red square, blue square"), bf16.predict(scene, "red square, blue square")
    assert low.precision_used == "bf16"
    assert np.abs(ref.scores - low.scores).max() < 0.03
    agreement = ((ref.mask_logits > 0) == (low.mask_logits > 0)).mean()
    assert agreement > 0.97, agreement


def test_half_weights_keep_sensitive_modules_fp32(tiny_checkpoint, segmenter, scene):
    seg = load_segmenter(str(tiny_checkpoint), precision="bf16", weights_dtype="bf16", force_precision=True, device="cpu")
    assert seg.model.vision_encoder.backbone.layers[0].mlp.fc1.weight.dtype is torch.bfloat16
    assert seg.model.detr_decoder.box_head.layer1.weight.dtype is torch.float32
    low, ref = seg.predict(scene, "red square"), segmenter.predict(scene, "red square")
    assert ((ref.mask_logits > 0) == (low.mask_logits > 0)).mean() > 0.95
    # fp32 asked for per call runs the bf16 weights upcast, and leaves them bf16 afterwards.
    upcast = seg.predict(scene, "red square", precision="fp32")
    assert upcast.precision_used == "fp32" and np.abs(upcast.scores - ref.scores).max() < 0.03
    assert np.abs(upcast.scores - low.scores).max() > 0, "the fp32 pass ran without autocast"
    assert seg.model.vision_encoder.backbone.layers[0].mlp.fc1.weight.dtype is torch.bfloat16
    assert seg.encode_image(scene, precision="fp32").fpn_hidden_states[0].dtype is torch.float32
    assert seg.model.vision_encoder.backbone.layers[0].mlp.fc1.weight.dtype is torch.bfloat16


@pytest.mark.parametrize(
    "overflowing",
    [
        "vision_encoder.backbone.embeddings.patch_embeddings.projection",
        # The scores' own clamp (+-12) must not turn an overflow in the detector into sure answers.
        "detr_decoder.layers.1.mlp.fc2",
    ],
)
def test_non_finite_half_precision_falls_back_to_fp32(tiny_checkpoint, scene, overflowing):
    seg = load_segmenter(str(tiny_checkpoint), precision="fp16", force_precision=True, device="cpu")
    with torch.no_grad():  # activations past fp16's 65504 overflow; fp32 and LayerNorm cope
        seg.model.get_submodule(overflowing).weight.mul_(1e5)
    with pytest.warns(Sam3Warning, match="non-finite"):
        result = seg.segment(scene, "red square", threshold=0.0)
    assert result.fallback_fp32 and result.precision_used == "fp32" and result.precision_requested == "fp16"
    assert seg.counters["fp32_fallbacks"] == 1
    assert all(np.isfinite(i.score) for i in result.instances)


def test_precision_can_change_per_call_without_reloading(fresh_segmenter, scene):
    seg = fresh_segmenter
    fp32 = seg.predict(scene, "red square")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = seg.predict(scene, "red square", precision="bf16")
    assert other.precision_requested == "bf16" and other.precision_used in ("bf16", "fp32")
    assert fp32.precision_used == "fp32"


def test_box_exemplars_alone_and_with_text(segmenter, scene):
    boxes_only = segmenter.predict(scene, None, boxes=[[15, 10, 60, 50]])
    assert [p.label for p in boxes_only.prompts] == ["exemplar"]
    both = segmenter.predict(scene, "red square", boxes=[[15, 10, 60, 50], [70, 40, 120, 80]], box_labels=[1, 0])
    text_only = segmenter.predict(scene, "red square")
    assert both.prompts[0].box_labels == (1, 0)
    assert not np.allclose(both.scores, text_only.scores), "the boxes reach the model"


def test_box_past_the_edge_is_clipped_to_the_image(segmenter, scene):
    raw = segmenter.predict(scene, "red square", boxes=[[15, 10, 1e308, 1e308]])
    height, width = raw.image_size
    assert raw.prompts[0].boxes == ((15.0, 10.0, float(width), float(height)),)
    assert np.isfinite(raw.scores).all(), "an overflowing box would make every score NaN"


def test_long_prompt_is_truncated_with_a_warning(segmenter, scene):
    with pytest.warns(Sam3Warning, match="tokens"):
        raw = segmenter.predict(scene, "a very long description of a red square in the corner")
    assert raw.scores.shape[0] == 1


def test_bad_calls_fail_clearly(segmenter, scene):
    with pytest.raises(PromptError):
        segmenter.segment(scene, "")
    with pytest.raises(ValueError, match="threshold"):
        segmenter.segment(scene, "dog", threshold=1.5)
    with pytest.raises(ValueError, match="refine"):
        segmenter.segment(scene, "dog", refine=7)


def test_concurrent_calls_give_the_same_answer(fresh_segmenter, scene):
    expected = fresh_segmenter.predict(scene[::-1].copy(), "red square, blue square").scores
    outputs, errors = [], []

    def work(flip: bool):
        try:
            image = scene[::-1].copy() if flip else scene
            outputs.append((flip, fresh_segmenter.predict(image, "red square, blue square").scores))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i % 2 == 0,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(outputs) == 6
    for flip, scores in outputs:
        if flip:
            np.testing.assert_allclose(scores, expected, atol=1e-6)


@pytest.mark.parametrize("device,message", [("gpu", "Unknown device"), ("cuda:0", "no usable CUDA")])
def test_bad_devices(tiny_checkpoint, device, message):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(PrecisionError, match=message):
        load_segmenter(str(tiny_checkpoint), device=device)


@pytest.mark.parametrize("weights", ["fp32", "bf16"])
def test_box_exemplars_run_under_bf16(tiny_checkpoint, segmenter, scene, weights):
    seg = load_segmenter(str(tiny_checkpoint), precision="bf16", weights_dtype=weights, force_precision=True, device="cpu")
    low = seg.predict(scene, "red square", boxes=[[15, 10, 60, 50]])
    ref = segmenter.predict(scene, "red square", boxes=[[15, 10, 60, 50]])
    assert low.precision_used == "bf16" and np.abs(low.scores - ref.scores).max() < 0.03


def test_prompts_with_and_without_boxes_in_one_call(segmenter, fresh_segmenter, scene):
    from sam3studio.types import Prompt

    boxed = Prompt("red square", boxes=((15.0, 10.0, 60.0, 50.0),), box_labels=(1,))
    mixed = segmenter.predict(scene, [Prompt("blue square"), boxed, Prompt("a cat")])
    alone = fresh_segmenter.predict(scene, ["blue square", "a cat"])
    np.testing.assert_allclose(mixed.scores[[0, 2]], alone.scores, atol=1e-5)
    with_box = fresh_segmenter.predict(scene, [boxed])
    np.testing.assert_allclose(mixed.scores[1], with_box.scores[0], atol=1e-5)


def test_cached_outputs_cannot_be_changed_by_a_caller(segmenter, scene):
    raw = segmenter.predict(scene, "red square")
    with pytest.raises(ValueError):
        raw.scores[0, 0] = 1.0


def test_the_cache_of_outputs_keeps_within_its_byte_budget():
    from sam3studio.segmenter import LruCache

    cache = LruCache(8, max_bytes=100, size_of=len)
    cache.put("a", "x" * 40)
    cache.put("b", "x" * 40)
    cache.get("a")  # "b" is now the least recently used
    cache.put("c", "x" * 40)
    assert cache.get("b") is None and cache.get("a") and cache.get("c")
    cache.put("huge", "x" * 101)
    assert cache.get("huge") is None and len(cache) == 2, "an entry over the whole budget is not kept"
    cache.put("a", "x" * 90)
    assert cache.get("c") is None and len(cache) == 1, "replacing an entry counts only its new size"


@pytest.mark.slow
def test_full_size_sam3_runs_through_the_segmenter(scene):
    """The real architecture (840 M random weights, 1008 px input): shapes, fp32 outputs and the
    batched path hold at full size, not only on the tiny model. About a minute on 2 CPU cores."""
    from pathlib import Path

    from transformers import Sam3Model

    from sam3studio.checkpoints import checkpoint_spec
    from sam3studio.loading import LoadedModel
    from sam3studio.precision import resolve
    from sam3studio.segmenter import Segmenter

    config, processor = checkpoint_spec("full")
    torch.manual_seed(0)
    model = Sam3Model(config).eval()
    seg = Segmenter(LoadedModel(model, processor, "full-random", Path("."), None), resolve("fp32"))
    raw = seg.predict(scene, "red square, blue square", boxes=[[15, 10, 60, 50]])
    assert raw.scores.shape == (2, 200) and raw.mask_logits.shape == (2, 200, 288, 288)
    assert raw.mask_logits.dtype == np.float32 and np.isfinite(raw.mask_logits).all()
    assert select(raw, threshold=0.0).image_size == (90, 130)


def test_many_prompts_run_in_passes_within_the_memory_budget_with_the_same_answers(tiny_checkpoint, scene, monkeypatch):
    from sam3studio import segmenter as S

    prompts = ["red thing", "blue thing", "thing", "square", "dog"]
    whole = S.load_segmenter(str(tiny_checkpoint), precision="fp32", device="cpu")
    expected = whole.predict(scene, prompts)
    assert whole.counters["forward_passes"] == 1
    monkeypatch.setattr(S, "PASS_BUDGET_BYTES", 1)  # one prompt per pass
    split = S.load_segmenter(str(tiny_checkpoint), precision="fp32", device="cpu")
    got = split.predict(scene, prompts)
    assert split.counters["forward_passes"] == len(prompts)
    np.testing.assert_allclose(got.scores, expected.scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.mask_logits, expected.mask_logits, rtol=1e-4, atol=1e-4)


def test_clear_caches_makes_the_next_call_encode_everything_again(fresh_segmenter, scene):
    seg = fresh_segmenter
    seg.predict(scene, "red square")
    seg.predict(scene, "red square")
    assert (seg.counters["image_encodings"], seg.counters["text_encodings"], seg.counters["forward_passes"]) == (1, 1, 1)
    seg.clear_caches()
    seg.predict(scene, "red square")
    assert (seg.counters["image_encodings"], seg.counters["text_encodings"], seg.counters["forward_passes"]) == (2, 2, 2)


@pytest.mark.parametrize("height", [1, 3])
def test_an_image_a_few_pixels_tall_is_read_as_height_width_channels(segmenter, height):
    def red(rows: int) -> np.ndarray:
        image = np.zeros((rows, 50, 3), np.uint8)
        image[..., 0] = 255
        return image

    # Both are all red once resized to the model's input, so their encodings agree, unless the
    # strip is read channels-first (then it is 1 or 3 channels of 50x3 pixels, red nowhere).
    strip, tall = segmenter.encode_image(red(height)).fpn_hidden_states[0], segmenter.encode_image(red(20)).fpn_hidden_states[0]
    assert torch.allclose(strip, tall, atol=1e-4)
