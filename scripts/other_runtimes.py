"""Image encoding of a SAM3 checkpoint in torch (as sam3studio runs it) against ONNX Runtime and
torch.compile, on this machine: the measurement behind "Other runtimes" in docs/benchmarks.md.

    .venv/bin/pip install onnxruntime onnx onnxscript      # not project dependencies
    .venv/bin/python scripts/other_runtimes.py --model bench/full/model-full-random --out /tmp/runtimes

Image encoding is the part another runtime could speed up: it is 90% of a new image's time at
full size and all matrix multiplication, while the prompt path is attention over image tokens,
already at torch's flash-attention speed. So the vision encoder alone is exported (ONNX, from
the plain transformers model: sam3studio's faster RoPE uses complex numbers, which ONNX lacks)
and every runtime encodes the same images; modes alternate image by image in one process
(these machines drift by ±15% over minutes), the first image of each is a warm-up, and medians
are printed with the CPU and each output's largest difference from torch fp32's.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from sam3studio import load_segmenter
from sam3studio.onnx_vision import VisionFeatures, export_fp32_graph, plain_rope, quantize_graph
from sam3studio.precision import cpu_info

Encoder = Callable[[torch.Tensor], list[np.ndarray]]


def torch_encoder(model_path: str, precision: str) -> Encoder:
    """sam3studio's own path: its precision plan, weights dtype and speedups."""
    seg = load_segmenter(model_path, precision=precision, device="cpu", force_precision=True)

    def encode(pixels: torch.Tensor) -> list[np.ndarray]:
        with torch.inference_mode(), seg.plan_for(precision).autocast():
            maps = seg.model.get_vision_features(pixel_values=pixels).fpn_hidden_states
        return [m.float().numpy() for m in maps]

    return encode


def compiled_encoder(model_path: str) -> Encoder:
    """torch.compile (inductor) of the plain fp32 vision encoder; compiling happens on the first call."""
    from transformers import Sam3Model

    module = torch.compile(VisionFeatures(Sam3Model.from_pretrained(model_path, use_safetensors=True).eval()))

    def encode(pixels: torch.Tensor) -> list[np.ndarray]:
        with torch.inference_mode(), plain_rope():
            outputs = module(pixels)
            return [m.numpy() for m in outputs[: len(outputs) // 2]]  # the maps; then their position encodings

    return encode


def export_onnx(model_path: str, pixels: torch.Tensor, folder: Path) -> tuple[Path, float]:
    """The plain fp32 vision encoder as ONNX, as the onnxruntime backend exports it."""
    path = folder / "vision.onnx"
    started = time.perf_counter()
    if not path.is_file():
        export_fp32_graph(Path(model_path), tuple(pixels.shape[-2:]), path)
    return path, time.perf_counter() - started


def quantize_onnx(path: Path) -> tuple[Path, float]:
    """The backend's dynamic int8 quantization of every MatMul, the counterpart of torch's int8."""
    quantized = path.with_name("vision-int8.onnx")
    started = time.perf_counter()
    if not quantized.is_file():
        quantize_graph(path, quantized)
    return quantized, time.perf_counter() - started


def onnx_encoder(path: Path) -> Encoder:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def encode(pixels: torch.Tensor) -> list[np.ndarray]:
        outputs = session.run(None, {"pixel_values": pixels.numpy()})
        return outputs[: len(outputs) // 2]  # the maps; then their position encodings

    return encode


def largest_difference(maps: list[np.ndarray], reference: list[np.ndarray]) -> float:
    """Largest absolute difference over all maps, relative to the reference's largest value."""
    scale = max(float(np.abs(r).max()) for r in reference)
    return max(float(np.abs(m - r).max()) for m, r in zip(maps, reference)) / scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a SAM3 checkpoint folder (sam3studio bench writes full-random's)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the exported ONNX files")
    parser.add_argument("--images", type=int, default=3, help="timed images per runtime, after one warm-up")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (minutes of compiling at full size)")
    parser.add_argument("--only", default="", help="comma-separated runtimes to time besides torch fp32, e.g. 'torch int8,onnxruntime int8'")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    cpu = cpu_info()
    print(f"CPU: {cpu.model}; bf16 flags: {', '.join(cpu.bf16_flags) or 'none'}; {torch.get_num_threads()} threads")
    seg = load_segmenter(args.model, precision="fp32", device="cpu")
    processor = seg.processor.image_processor
    rng = np.random.default_rng(0)
    images = [processor(images=rng.integers(0, 256, (900, 1200, 3), dtype=np.uint8), return_tensors="pt")["pixel_values"]
              for _ in range(args.images + 1)]
    del seg

    onnx_path, seconds = export_onnx(args.model, images[0], args.out)
    print(f"ONNX export: {seconds:.0f} s")
    int8_path, seconds = quantize_onnx(onnx_path)
    print(f"ONNX Runtime int8 quantization: {seconds:.0f} s")
    makers: dict[str, Callable[[], Encoder]] = {
        "torch fp32": lambda: torch_encoder(args.model, "fp32"),
        "torch auto": lambda: torch_encoder(args.model, "auto"),
        "torch int8": lambda: torch_encoder(args.model, "int8"),
        "onnxruntime fp32": lambda: onnx_encoder(onnx_path),
        "onnxruntime int8": lambda: onnx_encoder(int8_path),
    }
    if args.compile:
        makers["torch.compile fp32"] = lambda: compiled_encoder(args.model)
    chosen = {name.strip() for name in args.only.split(",") if name.strip()}
    if unknown := chosen - set(makers):
        parser.error(f"--only: unknown runtimes {sorted(unknown)}; known: {list(makers)}")
    encoders = {name: make() for name, make in makers.items() if not chosen or name in chosen or name == "torch fp32"}

    seconds: dict[str, list[float]] = {name: [] for name in encoders}
    outputs: dict[str, list[np.ndarray]] = {}
    for index, pixels in enumerate(images):
        for name, encode in encoders.items():
            started = time.perf_counter()
            maps = encode(pixels)
            if index > 0:
                seconds[name].append(time.perf_counter() - started)
            else:
                print(f"{name}: first call {time.perf_counter() - started:.1f} s")
            if index == len(images) - 1:
                outputs[name] = maps
    reference = outputs["torch fp32"]
    base = statistics.median(seconds["torch fp32"])
    print(f"\nimage encoding, {tuple(images[0].shape[-2:])} input, medians of {args.images}:")
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"{name:20s} {median:7.2f} s  x{median / base:.2f} of torch fp32   largest difference {largest_difference(outputs[name], reference):.1e}"
              f"   each: {', '.join(f'{v:.1f}' for v in values)}")


if __name__ == "__main__":
    main()
