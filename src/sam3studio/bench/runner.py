"""`sam3studio bench`: every precision mode, and plain `transformers` as the baseline, each
measured in a fresh subprocess on the same images and prompts; then mask agreement with fp32,
and a report (markdown, JSON, PNG) whose every figure is also a ratio to the baseline."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..precision import Precision, cpu_info
from ..segmenter import BACKENDS
from .worker import BASELINE, WorkerResult, WorkerSpec, split_mode

FULL_RANDOM = "full-random"
PROMPTS = ("red circle", "blue square", "green triangle", "yellow star", "purple circle",
           "orange square", "red star", "blue triangle", "green circle", "yellow square",
           "purple star", "orange triangle", "red square", "blue circle", "green star", "yellow triangle")


class BenchError(ValueError):
    """A benchmark that cannot run as asked; the message says what to change."""


@dataclass
class BenchConfig:
    out: str
    model: str = "demo"  # FULL_RANDOM, "demo", or a model folder / hub id
    precisions: tuple[str, ...] = ("fp32", "bf16", "auto")
    size: int = 1008  # side of the square test images, in pixels
    images: int = 3  # measured images (one more is run first as a warm-up)
    prompts: int = 10  # the many-prompt case; the one-prompt case is always measured
    baseline: bool = True
    device: str = "cpu"
    force_precision: bool = False
    quality_data: str | None = None  # COCO dataset for mIoU; default: a synthetic set for "demo"
    quality_images: int = 50


def run_bench(config: BenchConfig, on_progress=print) -> dict:
    """Measure, write report.md / results.json / chart.png to `config.out`, return the results."""
    _check(config)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("masks-*.npz"):  # an earlier run's masks would be compared as this run's
        stale.unlink()
    model = _model_folder(config, out, on_progress)
    images = _test_images(out / "images", config.size, config.images + 1)
    prompts = list(PROMPTS[: config.prompts])
    quality = config.quality_data or (_synthetic_quality_set(out) if config.model == "demo" else None)
    runs: dict[str, WorkerResult] = {}
    engines = ([(BASELINE, "fp32")] if config.baseline else []) + [("sam3studio", p) for p in config.precisions]
    for engine, precision in engines:
        name = BASELINE if engine == BASELINE else precision
        on_progress(f"measuring {name} in a fresh process")
        spec = WorkerSpec(
            model=model, engine=engine, precision=precision, images=[str(p) for p in images], prompts=prompts,
            extra_prompt=PROMPTS[-1], device=config.device, force_precision=config.force_precision,
            masks_out=str(out / f"masks-{name}.npz") if engine != BASELINE else None,
            quality_data=quality if engine != BASELINE else None, quality_limit=config.quality_images,
        )
        runs[name] = _run_worker(spec, out / f"run-{name}")
    agreement = mask_agreement(out, [p for p in config.precisions])
    results = {"config": asdict(config), "machine": machine(), "runs": {k: asdict(v) for k, v in runs.items()}, "mask_agreement": agreement}
    from .report import write_report

    write_report(results, out)
    return results


def _check(config: BenchConfig) -> None:
    for mode in config.precisions:
        precision, backend = split_mode(mode)
        Precision.parse(precision)  # raises PrecisionError naming the choices
        if backend not in BACKENDS:
            raise BenchError(f"mode {mode!r}: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
    if not 1 <= config.images <= 100:
        raise BenchError(f"--images {config.images}: measure between 1 and 100 images.")
    if not 1 <= config.prompts <= len(PROMPTS) - 1:
        raise BenchError(f"--prompts {config.prompts}: between 1 and {len(PROMPTS) - 1}.")
    if not 64 <= config.size <= 4096:
        raise BenchError(f"--size {config.size}: images between 64 and 4096 pixels a side.")


def _model_folder(config: BenchConfig, out: Path, on_progress) -> str:
    """full-random is written once under `out` (about 3.4 GB) and loaded like any folder, so
    that loading is measured on the real code path."""
    if config.model != FULL_RANDOM:
        return config.model
    from ..checkpoints import build_random_checkpoint

    folder = out / "model-full-random"
    if not (folder / "config.json").is_file():
        on_progress(f"building full-size SAM3 with random weights in {folder} (once)")
        build_random_checkpoint(folder, "full", init_std=None)
    return str(folder)


def _test_images(folder: Path, size: int, count: int) -> list[Path]:
    """Shapes scenes of size x size pixels, the same for every mode and every run."""
    from PIL import Image

    from ..train.shapes import SceneConfig, render_scene

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"scene{index}-{size}.png"
        if not path.is_file():
            rgb, _ = render_scene(np.random.default_rng([2024, index]), SceneConfig(min_side=size, max_side=size))
            Image.fromarray(rgb).save(path)
        paths.append(path)
    return paths


def _synthetic_quality_set(out: Path) -> str:
    from ..train.presets import DEMO_DATA
    from ..train.shapes import write_dataset

    folder = out / "quality-data"
    if not (folder / "annotations.json").is_file():
        count, seed = DEMO_DATA["test"]
        write_dataset(folder, count, seed)
    return str(folder)


def _run_worker(spec: WorkerSpec, stem: Path) -> WorkerResult:
    spec_path, result_path = stem.with_suffix(".spec.json"), stem.with_suffix(".json")
    spec_path.write_text(json.dumps(asdict(spec), indent=1))
    result_path.unlink(missing_ok=True)
    done = subprocess.run([sys.executable, "-m", "sam3studio.bench.worker", str(spec_path), str(result_path)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode != 0 or not result_path.is_file():
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise BenchError(f"the {spec.engine} {spec.precision} measurement failed (exit {done.returncode}):\n{tail}")
    return WorkerResult(**json.loads(result_path.read_text()))


def mask_agreement(out: Path, precisions: list[str], top: int = 5) -> dict[str, float | None]:
    """Mean IoU of each mode's masks with fp32's, over every image and prompt, for the `top`
    queries fp32 scores highest: the queries are the same slots in every mode, so slot i of a
    mode is compared with slot i of fp32. Masks that fp32 leaves empty or full are skipped:
    random weights make many such, and they would agree trivially. None when all are."""
    reference_path = out / "masks-fp32.npz"
    if not reference_path.is_file():
        return {}
    reference = np.load(reference_path)
    agreement = {}
    for mode in precisions:
        path = out / f"masks-{mode}.npz"
        if mode == "fp32" or not path.is_file():
            continue
        other = np.load(path)
        ious = []
        for key in (k for k in reference.files if k.endswith("_masks")):
            scores = reference[key.replace("_masks", "_scores")]
            best = np.argsort(-scores, axis=1)[:, :top]
            a, b = np.unpackbits(reference[key], axis=-1), np.unpackbits(other[key], axis=-1)
            for prompt, queries in enumerate(best):
                ious += [_iou(a[prompt, q], b[prompt, q]) for q in queries if 0 < a[prompt, q].mean() < 1]
        agreement[mode] = float(np.mean(ious)) if ious else None
    return agreement


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def machine() -> dict:
    """What every figure depends on: CPU model and its bf16 abilities, threads, versions, GPU."""
    import torch
    import transformers

    cpu = cpu_info()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu.model, "bf16_flags": list(cpu.bf16_flags), "native_bf16": cpu.native_bf16, "bf16_faster": cpu.bf16_faster,
        "fp32_gflops": cpu.fp32_gflops, "bf16_gflops": cpu.bf16_gflops, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "gpu": gpu, "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
    }
