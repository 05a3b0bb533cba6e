import numpy as np
import pytest
import torch

from sam3studio import precision as P
from sam3studio.precision import Precision, PrecisionError, resolve


@pytest.fixture
def cpu_with(monkeypatch):
    """Force the detected CPU capability either way, whatever this machine is."""

    def force(native: bool, faster: bool | None = None):
        info = P.CpuInfo("test cpu", ("avx512_bf16",) if native else (), native, native if faster is None else faster, None, None, "test")
        monkeypatch.setattr(P, "cpu_info", lambda: info)

    return force


def test_detection_is_consistent_with_flags():
    info = P.cpu_info()
    assert info.source in ("timed", "env", "no-flags")
    if info.source == "no-flags":
        assert not info.native_bf16 and not info.bf16_flags
    if info.bf16_faster:
        assert info.native_bf16


def test_env_override(monkeypatch):
    P.cpu_info.cache_clear()
    try:
        monkeypatch.setenv(P.NATIVE_BF16_ENV, "0")
        assert P.cpu_info().native_bf16 is False
        P.cpu_info.cache_clear()
        monkeypatch.setenv(P.NATIVE_BF16_ENV, "1")
        assert P.cpu_info().native_bf16 is True
    finally:
        P.cpu_info.cache_clear()


def test_cpu_without_native_bf16(cpu_with):
    cpu_with(native=False)
    assert resolve("auto").used is Precision.FP32
    for mode in ("bf16", "fp16"):
        plan = resolve(mode)
        assert plan.used is Precision.FP32 and plan.requested.value == mode
        assert "no native bf16" in plan.reason and "--force-precision" in plan.reason
    forced = resolve("bf16", force=True)
    assert forced.used is Precision.BF16 and forced.reason == ""


def test_cpu_with_fast_native_bf16(cpu_with):
    cpu_with(native=True)
    assert resolve("auto").used is Precision.BF16
    assert resolve("bf16").used is Precision.BF16
    fp16 = resolve("fp16")
    assert fp16.used is Precision.BF16 and "fp16" in fp16.reason
    assert resolve("fp16", force=True).used is Precision.FP16


def test_cpu_with_native_but_slower_bf16(cpu_with):
    cpu_with(native=True, faster=False)
    assert resolve("auto").used is Precision.FP32  # auto picks the faster mode
    assert resolve("bf16").used is Precision.BF16  # an explicit request is honoured


def test_cuda_plans_do_not_need_a_gpu():
    plan = resolve("auto", "cuda")
    assert plan.used is Precision.FP16 and plan.autocast_dtype is torch.float16
    assert resolve("fp32", "cuda").autocast_dtype is None
    if not torch.cuda.is_available():
        assert resolve("bf16", "cuda:1").used is Precision.FP16, "no GPU to ask: bf16 is not known to work"


def test_unknown_precision_and_device():
    with pytest.raises(PrecisionError, match="choose one of fp32, fp16, bf16, auto"):
        resolve("fp64")
    with pytest.raises(PrecisionError, match="not supported"):
        resolve("fp32", "mps")


def test_weights_dtype(cpu_with):
    cpu_with(native=True)
    assert resolve("bf16", weights_dtype="bf16").weights_dtype is torch.bfloat16
    with pytest.raises(PrecisionError, match="cannot run"):
        resolve("bf16", weights_dtype="fp16")
    fp16 = resolve("fp16", weights_dtype="fp16")  # fp16 runs as bf16 here, and so do its weights
    assert fp16.weights_dtype is torch.bfloat16 and "weights stored as bf16" in fp16.reason
    # auto stores weights in the dtype it runs; explicit modes keep fp32 weights unless asked.
    assert resolve("auto").weights_dtype is torch.bfloat16
    assert resolve("auto", weights_dtype="fp32").weights_dtype is torch.float32
    assert resolve("bf16").weights_dtype is torch.float32
    assert resolve("auto", "cuda").weights_dtype is torch.float16
    cpu_with(native=True, faster=False)
    assert resolve("auto").weights_dtype is torch.float32
    cpu_with(native=False)
    fallback = resolve("bf16", weights_dtype="bf16")
    assert fallback.weights_dtype is torch.float32 and "weights stay fp32" in fallback.reason


def test_sensitive_modules_compute_in_fp32_under_cpu_autocast(segmenter):
    head = segmenter.model.detr_decoder.box_head
    x = torch.randn(3, head.layer1.in_features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert head(x).dtype is torch.float32
        assert segmenter.model.detr_decoder.layers[0].self_attn.q_proj(x).dtype is torch.bfloat16
    assert P.keep_sensitive_modules_fp32(segmenter.model) >= len(P.FP32_MODULE_NAMES)


def test_half_weights_leave_fp32_modules_bit_exact(tiny_checkpoint):
    from sam3studio.loading import load_model

    model = load_model(str(tiny_checkpoint)).model
    before = {n: t.clone() for n, t in model.named_buffers()}  # RoPE frequencies and positions among them
    before |= {n: t.clone() for n, t in model.named_parameters() if "box_head" in n}
    assert any("rotary" in n for n in before) and any("position_ids" in n for n in before) and any("box_head" in n for n in before)
    P.cast_weights(model, torch.bfloat16)
    after = dict(model.named_buffers()) | dict(model.named_parameters())
    for name, value in before.items():
        assert after[name].dtype == value.dtype and torch.equal(after[name], value), name
    assert model.text_projection.weight.dtype is torch.bfloat16


def test_loading_straight_into_half_weights_matches_casting_after_loading(tiny_checkpoint):
    from sam3studio.loading import load_model

    cast = load_model(str(tiny_checkpoint)).model
    P.cast_weights(cast, torch.bfloat16)
    direct = load_model(str(tiny_checkpoint), weights_dtype=torch.bfloat16).model
    expected = dict(cast.named_parameters()) | dict(cast.named_buffers())
    loaded = dict(direct.named_parameters()) | dict(direct.named_buffers())
    assert expected.keys() == loaded.keys()
    for name, value in expected.items():
        assert loaded[name].dtype == value.dtype and torch.equal(loaded[name], value), name
    assert direct.detr_decoder.box_head.layer1.weight.dtype is torch.float32


def test_int8_resolves_on_cpu_and_becomes_fp16_on_cuda():
    assert resolve("int8", "cpu").used is Precision.INT8
    cuda = resolve("int8", "cuda")
    assert cuda.used is Precision.FP16 and "CPUs only" in cuda.reason
    assert resolve("int8", "cpu").autocast_dtype is None
    with pytest.raises(PrecisionError, match="int8"):
        resolve("int8", "cpu", weights_dtype="bf16")


def test_int8_quantizes_linear_layers_but_not_the_fp32_modules(tiny_checkpoint, scene):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

    from sam3studio import load_segmenter
    from sam3studio.precision import fp32_modules

    fp32 = load_segmenter(str(tiny_checkpoint), precision="fp32", device="cpu")
    int8 = load_segmenter(str(tiny_checkpoint), precision="int8", device="cpu")
    quantized = [m for m in int8.model.modules() if isinstance(m, DynamicInt8Linear)]
    assert len(quantized) > 50
    assert not any(isinstance(m, DynamicInt8Linear) for top in fp32_modules(int8.model) for m in top.modules())
    a, b = fp32.predict(scene, "red thing, blue thing"), int8.predict(scene, "red thing, blue thing")
    assert b.precision_used == "int8" and not b.fallback_fp32
    agree = np.logical_and(a.mask_logits > 0, b.mask_logits > 0).sum() / np.logical_or(a.mask_logits > 0, b.mask_logits > 0).sum()
    assert agree > 0.9
    assert np.abs(a.scores - b.scores).max() < 0.05
    with pytest.raises(PrecisionError, match="load it again"):
        int8.predict(scene, "red thing", precision="fp32")
    with pytest.raises(PrecisionError, match="load it again"):
        fp32.predict(scene, "red thing", precision="int8")
