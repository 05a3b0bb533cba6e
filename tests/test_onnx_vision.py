"""The onnxruntime backend on the tiny checkpoint: its int8 image encoding stays near torch's
fp32 one, it is exported once per checkpoint, and it is refused where it does not apply."""

from __future__ import annotations

import os
import platform
import shutil

import numpy as np
import pytest
import torch

from sam3studio import PrecisionError, load_segmenter
from sam3studio.onnx_vision import GRAPH_FILE, VisionFeatures, cache_root, export_fp32_graph, graph_key, seven_bit_weights

pytest.importorskip("onnxruntime", reason="the onnx extra (part of the dev install) is missing")

IMAGE = np.random.default_rng(3).integers(0, 256, (120, 160, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def onnx_segmenter(tiny_checkpoint, onnx_cache):
    return load_segmenter(str(tiny_checkpoint), precision="int8", device="cpu", backend="onnxruntime")


def _largest_relative_difference(maps, reference) -> float:
    return max(float((m - r).abs().max() / r.abs().max()) for m, r in zip(maps, reference))


def test_onnx_int8_encoding_is_as_near_fp32_as_torch_int8(onnx_segmenter, segmenter, tiny_checkpoint):
    torch_int8 = load_segmenter(str(tiny_checkpoint), precision="int8", device="cpu")
    reference = segmenter.encode_image(IMAGE)
    onnx = onnx_segmenter.encode_image(IMAGE)
    assert [m.shape for m in onnx.fpn_hidden_states] == [m.shape for m in reference.fpn_hidden_states]
    for position, expected in zip(onnx.fpn_position_encoding, reference.fpn_position_encoding):
        torch.testing.assert_close(position, expected)
    onnx_error = _largest_relative_difference(onnx.fpn_hidden_states, reference.fpn_hidden_states)
    torch_error = _largest_relative_difference(torch_int8.encode_image(IMAGE).fpn_hidden_states, reference.fpn_hidden_states)
    assert 0 < onnx_error < 0.05
    assert onnx_error < 2 * torch_error


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="the choice is for x86 CPUs")
def test_weights_are_seven_bit_without_vnni_and_the_cache_tells_them_apart(tiny_checkpoint, monkeypatch):
    import sam3studio.precision as precision

    keys = {}
    for vnni in (True, False):
        monkeypatch.setattr(precision, "cpu_has_any", lambda flags, vnni=vnni: vnni)
        assert seven_bit_weights() is not vnni
        keys[vnni] = graph_key(tiny_checkpoint, (112, 112))
    assert keys[True] != keys[False], "a graph quantized for one CPU is not reused on the other kind"


def test_long_attention_is_exported_in_query_chunks_with_the_same_result(tiny_checkpoint, tmp_path):
    """The tiny ViT's one global layer attends over 64 tokens: in pieces of 20 queries it is 4
    softmaxes instead of 1, and the graph still computes torch's features."""
    import onnx
    import onnxruntime as ort
    from transformers import Sam3Model

    softmaxes, outputs = {}, {}
    pixels = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    for name, chunk in (("chunked", 20), ("whole", 10**6)):
        graph = tmp_path / f"{name}.onnx"
        export_fp32_graph(tiny_checkpoint, (112, 112), graph, attention_chunk=chunk)
        softmaxes[name] = sum(node.op_type == "Softmax" for node in onnx.load(str(graph), load_external_data=False).graph.node)
        outputs[name] = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": pixels.numpy()})
    assert softmaxes["chunked"] == softmaxes["whole"] + 3
    with torch.no_grad():
        expected = VisionFeatures(Sam3Model.from_pretrained(tiny_checkpoint).eval())(pixels)
    assert _largest_relative_difference([torch.from_numpy(o) for o in outputs["chunked"]], expected) < 1e-5


def test_onnx_backend_scores_like_torch_int8(onnx_segmenter, tiny_checkpoint):
    torch_int8 = load_segmenter(str(tiny_checkpoint), precision="int8", device="cpu")
    ours = onnx_segmenter.predict(IMAGE, "red car, dog")
    theirs = torch_int8.predict(IMAGE, "red car, dog")
    assert ours.precision_used == "int8" and ours.scores.shape == theirs.scores.shape
    np.testing.assert_allclose(ours.scores, theirs.scores, atol=0.05)  # random weights: near-ties may swap ranks


def test_the_graph_is_exported_once_and_frees_torchs_vision_weights(onnx_segmenter, tiny_checkpoint, onnx_cache):
    graphs = list(onnx_cache.glob(f"*/{GRAPH_FILE}"))
    assert len(graphs) == 1
    written = graphs[0].stat().st_mtime_ns
    again = load_segmenter(str(tiny_checkpoint), precision="int8", device="cpu", backend="onnxruntime")
    assert graphs[0].stat().st_mtime_ns == written and len(list(onnx_cache.glob(f"*/{GRAPH_FILE}"))) == 1
    torch_int8 = load_segmenter(str(tiny_checkpoint), precision="int8", device="cpu")
    vision = sum(p.numel() for p in torch_int8.model.vision_encoder.parameters())
    assert vision > 0 and not list(again.model.vision_encoder.parameters())


def test_a_changed_checkpoint_gets_a_new_graph(tiny_checkpoint, tmp_path, onnx_cache):
    copy = shutil.copytree(tiny_checkpoint, tmp_path / "copy")
    key = graph_key(copy, (112, 112))
    assert key != graph_key(copy, (224, 224))
    weights = next(copy.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1_000_000_000))
    assert graph_key(copy, (112, 112)) != key
    assert cache_root() == onnx_cache


@pytest.mark.parametrize("precision, backend", [("fp32", "onnxruntime"), ("int8", "tensorrt")])
def test_backends_outside_their_reach_are_refused(tiny_checkpoint, precision, backend):
    with pytest.raises(PrecisionError, match="backend"):
        load_segmenter(str(tiny_checkpoint), precision=precision, device="cpu", backend=backend)
