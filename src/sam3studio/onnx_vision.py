"""Image encoding through ONNX Runtime with dynamic int8 weights, the one other runtime that beat
torch here: at full size on a Zen 4 it encoded a 1008 px image in 16.0 s against torch int8's
22.8 s (medians of 5, alternating in one process; scripts/other_runtimes.py), with outputs
nearer fp32's. It needs more memory: the process peaked at 8.3 GB against torch int8's 3.4 GB
(bench, one image) before long attention was exported in pieces (`chunked_long_attention`),
which took an ONNX Runtime session's own peak from 6.8 to 4.2 GB, and its memory arena off to
2.8-3.0 GB. So torch stays the default.
ONNX Runtime's fp32 was no faster than torch's (43.4 s against 40.1 s), so only
int8 goes through it, and only the vision encoder: the prompt path is attention over image
tokens, already at torch's flash-attention speed.

The graph is exported from the checkpoint's fp32 weights the first time a model is used this
way (at full size 130 s and a 10 GB peak, once) and kept in a cache folder keyed by the
checkpoint's files, so later loads read the int8 graph straight away.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from .loading import ModelLoadError

CACHE_ENV = "SAM3_ONNX_CACHE"
GRAPH_FILE = "vision-int8.onnx"
_EXPORT_VERSION = 2  # bump when the exported graph or its quantization changes (2: attention in query chunks)
# Queries per piece of a long attention in the exported graph (see `chunked_long_attention`).
ATTENTION_CHUNK = 1024


class OnnxUnavailableError(ModelLoadError):
    """The onnxruntime backend was asked for without its packages installed."""


class VisionFeatures(torch.nn.Module):
    """The vision encoder's FPN maps and their position encodings as plain tuples: what
    `Sam3Model.get_vision_features` gives the prompt path."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        vision = self.model.get_vision_features(pixel_values=pixel_values)
        return (*vision.fpn_hidden_states, *vision.fpn_position_encoding)


@contextlib.contextmanager
def plain_rope() -> Iterator[None]:
    """transformers' own RoPE while exporting or compiling: sam3studio's (installed process-wide
    by its first Segmenter, see `speedups.install_complex_rope`) takes complex numbers and a
    data-dependent check, which neither torch.export nor ONNX takes."""
    from transformers.models.sam3 import modeling_sam3

    installed = modeling_sam3.apply_rotary_pos_emb_2d
    modeling_sam3.apply_rotary_pos_emb_2d = getattr(installed, "_sam3studio_original", installed)
    try:
        yield
    finally:
        modeling_sam3.apply_rotary_pos_emb_2d = installed


@contextlib.contextmanager
def chunked_long_attention(chunk: int = ATTENTION_CHUNK) -> Iterator[None]:
    """Attention over more than `chunk` queries as several attentions over `chunk` queries each,
    while exporting. ONNX has no flash attention: the exporter writes SDPA as MatMul, Softmax,
    MatMul, so each of the ViT's global layers held its whole 16 x 5184 x 5184 score matrix
    (1.7 GB in fp32, twice over with the softmax) where torch never does. Split by queries, the
    result is the same (each query's softmax runs over all keys) and a piece holds a fifth."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    plain = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def in_chunks(module, query, key, value, attention_mask, *args, **kwargs):
        if query.shape[2] <= chunk or attention_mask is not None or getattr(module, "is_causal", True):
            return plain(module, query, key, value, attention_mask, *args, **kwargs)
        pieces = [plain(module, part, key, value, None, *args, **kwargs)[0] for part in query.split(chunk, dim=2)]
        return torch.cat(pieces, dim=1), None  # (batch, queries, heads, head dim)

    had_local = "sdpa" in ALL_ATTENTION_FUNCTIONS._local_mapping
    ALL_ATTENTION_FUNCTIONS["sdpa"] = in_chunks
    try:
        yield
    finally:
        if had_local:
            ALL_ATTENTION_FUNCTIONS["sdpa"] = plain
        else:
            del ALL_ATTENTION_FUNCTIONS["sdpa"]


def require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise OnnxUnavailableError(
            f"The onnxruntime backend needs onnxruntime, onnx and onnxscript ({err.name} is missing): "
            "pip install 'sam3studio[onnx]', or use the torch backend."
        ) from None


def cache_root() -> Path:
    from huggingface_hub import constants

    return Path(os.environ.get(CACHE_ENV) or Path(constants.HF_HOME) / "sam3studio" / "onnx")


def graph_key(folder: Path, input_size: tuple[int, int]) -> str:
    """Names the exported graph of one checkpoint at one input size: the config and every
    weight file's name, size and modification time, so a changed checkpoint exports again, and
    the weights' bit width, which depends on the CPU."""
    import onnxruntime

    digest = hashlib.sha256(json.dumps([_EXPORT_VERSION, onnxruntime.__version__, torch.__version__, list(input_size), seven_bit_weights()]).encode())
    digest.update((folder / "config.json").read_bytes())
    for path in sorted(folder.glob("*.safetensors")):
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:24]


def export_fp32_graph(folder: Path, input_size: tuple[int, int], path: Path, attention_chunk: int = ATTENTION_CHUNK) -> None:
    """The checkpoint's vision encoder as ONNX, from its fp32 weights (weights as external data:
    over 2 GB at full size), attention over more than `attention_chunk` queries in pieces."""
    from transformers import Sam3Model

    from .allocator import release_freed_memory

    model = Sam3Model.from_pretrained(folder, use_safetensors=True, local_files_only=True, dtype=torch.float32).eval()
    pixels = torch.zeros(1, 3, *input_size)
    with torch.inference_mode(), plain_rope(), chunked_long_attention(attention_chunk), _quiet_exporter():
        torch.onnx.export(VisionFeatures(model).eval(), (pixels,), str(path), input_names=["pixel_values"], dynamo=True, external_data=True)
    del model
    release_freed_memory()


def quantize_graph(fp32_graph: Path, int8_graph: Path) -> None:
    """Every MatMul weight to int8 (activations quantized per call, as torch's dynamic int8 does),
    in 7 bits where `seven_bit_weights` says so."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_exporter():
        quantize_dynamic(fp32_graph, int8_graph, weight_type=QuantType.QInt8, reduce_range=seven_bit_weights(),
                         op_types_to_quantize=["MatMul"], use_external_data_format=True)


def seven_bit_weights() -> bool:
    """On an x86 CPU without VNNI, ONNX Runtime's int8 MatMul sums pairs of u8 x s8 products in
    int16 (vpmaddubsw), which full-range weights can overflow; its docs advise 7-bit weights
    there. On an AMD Zen 1 (AVX2 only) the tiny test model's features were off by 0.055 of their
    range with 8-bit weights, 0.025 with 7-bit, where torch's dynamic int8 gives 0.026. With VNNI
    the sums are int32, and 8 bits keep their extra precision."""
    import platform

    from .precision import cpu_has_any

    return platform.machine().lower() in ("x86_64", "amd64") and not cpu_has_any(("avx512_vnni", "avx_vnni", "amx_int8"))


def export_int8_graph(folder: Path, input_size: tuple[int, int], destination: Path) -> Path:
    """The int8 graph in `destination`; the fp32 one is made in a scratch folder and removed."""
    destination.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=destination) as scratch:
        fp32_graph, int8_graph = Path(scratch) / "vision-fp32.onnx", Path(scratch) / GRAPH_FILE
        export_fp32_graph(folder, input_size, fp32_graph)
        quantize_graph(fp32_graph, int8_graph)
        weights = [p for p in Path(scratch).iterdir() if p != int8_graph and not p.name.startswith("vision-fp32")]
        for path in [*weights, int8_graph]:  # the graph last: once it is there, its weights are too
            shutil.move(str(path), destination / path.name)
    return destination / GRAPH_FILE


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """torch.onnx prints a line per export step, and the quantizer advice it does not need
    here (graph pre-processing): a library keeps both quiet. Errors still raise."""
    logging.disable(logging.WARNING)
    try:
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            yield
    finally:
        logging.disable(logging.NOTSET)


class OnnxVisionEncoder:
    """An ONNX Runtime session that encodes images as `Sam3Model.get_vision_features` does."""

    def __init__(self, graph: Path, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: it warns about every unused initializer
        # The arena keeps the largest set of activations a run ever held, 1.2 GB at full size:
        # without it the session peaked at 2.8-3.0 GB instead of 4.0, and encoded as fast.
        options.enable_cpu_mem_arena = False
        self.session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])

    @classmethod
    def for_checkpoint(cls, folder: Path, input_size: tuple[int, int]) -> OnnxVisionEncoder:
        """The checkpoint's int8 graph from the cache, exported first if it is not there yet."""
        require_onnx()
        cached = cache_root() / graph_key(folder, input_size)
        graph = cached / GRAPH_FILE
        if not graph.is_file():
            export_int8_graph(folder, input_size, cached)
        return cls(graph)

    def __call__(self, pixel_values: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """(FPN maps, their position encodings), float32 tensors on the CPU."""
        outputs = [torch.from_numpy(o) for o in self.session.run(None, {"pixel_values": pixel_values.float().cpu().numpy()})]
        levels = len(outputs) // 2  # the maps, then as many position encodings (see VisionFeatures)
        return tuple(outputs[:levels]), tuple(outputs[levels:])
