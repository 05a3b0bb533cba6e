"""One benchmark measurement in a process of its own, so that its peak memory is its own.

Run by the runner as `python -m sam3studio.bench.worker SPEC.json RESULT.json`. A spec names the
model folder, the engine ("sam3studio" with a precision mode, or "transformers" for the plain
baseline), the images and prompts; the result holds per-image timings in milliseconds, the
load time, peak memory, and (for sam3studio) the binarised masks for the agreement check.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..segmenter import synchronize

BASELINE = "transformers"


@dataclass
class WorkerSpec:
    model: str  # a folder, or "demo"
    engine: str  # "sam3studio" or BASELINE
    precision: str  # a bench mode for sam3studio ("bf16", "int8+onnxruntime": see split_mode); the baseline runs fp32
    images: list[str]  # image files; the first is a warm-up and not reported
    prompts: list[str]  # the first is the one-prompt case, all of them the many-prompt case
    extra_prompt: str  # "one more prompt" on an already encoded image
    device: str = "cpu"
    force_precision: bool = False
    masks_out: str | None = None  # .npz for the masks the agreement check compares
    quality_data: str | None = None  # COCO dataset for mIoU (a trained model only)
    quality_limit: int | None = None


@dataclass
class WorkerResult:
    engine: str
    precision_requested: str
    precision_used: str
    load_s: float
    timings_ms: dict[str, list[float]] = field(default_factory=dict)  # stage -> one value per measured image
    peak_rss_mb: float = 0.0
    cuda_peak_mb: float | None = None
    quality: dict | None = None


def _timed(device: str, call: Callable[[], object]) -> tuple[object, float]:
    """(what `call` returned, its wall time in ms), after the device has finished the work."""
    synchronize(torch.device(device))
    start = time.perf_counter()
    value = call()
    synchronize(torch.device(device))
    return value, (time.perf_counter() - start) * 1000


def _record(timings: dict[str, list[float]], **stages: float) -> None:
    for stage, ms in stages.items():
        timings.setdefault(stage, []).append(ms)


def _import_transformers() -> None:
    """Import the model classes before the load clock starts: the import (about 5 s, torch._dynamo
    included) is the same for both engines and is not what "load" measures."""
    from transformers import Sam3Model, Sam3Processor  # noqa: F401


# --- sam3studio --------------------------------------------------------------------------------


def split_mode(mode: str) -> tuple[str, str]:
    """A bench mode is a precision, optionally with the backend that encodes images:
    "int8+onnxruntime" -> ("int8", "onnxruntime"); "bf16" -> ("bf16", "torch")."""
    precision, _, backend = mode.partition("+")
    return precision, backend or "torch"


def measure_sam3studio(spec: WorkerSpec) -> WorkerResult:
    from ..images import load_image
    from ..postprocess import select
    from ..segmenter import load_segmenter
    from ..types import Prompt

    _import_transformers()
    precision, backend = split_mode(spec.precision)
    def load(views: int | None):
        return load_segmenter(spec.model, precision=precision, device=spec.device, force_precision=spec.force_precision, backend=backend, views=views)

    # Timed on one view, the pass the baseline makes; a model that asks for test-time views (the
    # demo model) is scored for quality with them, as its users run it.
    seg, load_ms = _timed(spec.device, lambda: load(1))
    one, many, extra = [Prompt(spec.prompts[0])], [Prompt(p) for p in spec.prompts], [Prompt(spec.extra_prompt)]
    timings: dict[str, list[float]] = {}
    masks: dict[str, np.ndarray] = {}
    raw = None
    for index, path in enumerate(spec.images):
        rgb = load_image(path)
        # Every image starts with empty caches: the prompts repeat from image to image, and a
        # cached text embedding would time a "new prompt" without its text encoding, which the
        # baseline always pays.
        seg.clear_caches()
        first, first_ms = _timed(spec.device, lambda: seg.predict(rgb, one))
        raw, many_ms = _timed(spec.device, lambda: seg.predict(rgb, many))
        _, extra_ms = _timed(spec.device, lambda: seg.predict(rgb, extra))
        if index == 0:
            continue  # the warm-up: every path and batch shape has run once
        _, select0_ms = _timed("cpu", lambda: select(raw, threshold=seg.default_threshold, refine=0))
        _, select1_ms = _timed("cpu", lambda: select(raw, threshold=seg.default_threshold, refine=1))
        _record(
            timings,
            new_image_1_prompt=first_ms, encode_image=first.timings_ms.get("encode_image", 0.0),
            prompt_path_1=first.timings_ms.get("encode_text", 0.0) + first.timings_ms.get("detect", 0.0),
            one_more_prompt=extra_ms, prompts_n_encoded=many_ms, new_image_n_prompts=first.timings_ms.get("encode_image", 0.0) + many_ms,
            postprocess_refine0=select0_ms, postprocess_refine1=select1_ms,
        )
        masks[f"image{index}_masks"] = np.packbits(raw.mask_logits > 0, axis=-1)
        masks[f"image{index}_scores"] = raw.scores
    peak_rss_mb, cuda_peak_mb = _peak_memory(spec.device)  # before the quality pass, which the baseline does not run
    quality = _quality(load(None), spec) if spec.quality_data else None
    if spec.masks_out and masks:
        np.savez_compressed(spec.masks_out, **masks)
    plan = seg.default_plan
    used = plan.describe() + (f", images by {backend}" if backend != "torch" else "")
    return WorkerResult("sam3studio", plan.requested.value, used, load_ms / 1000, timings, peak_rss_mb, cuda_peak_mb, quality)


def _peak_memory(device: str) -> tuple[float, float | None]:
    """(peak resident memory of this process, peak CUDA memory allocated on `device` or None), in MB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    return rss, torch.cuda.max_memory_allocated(torch.device(device)) / 2**20 if device.startswith("cuda") else None


def _quality(seg, spec: WorkerSpec) -> dict:
    """mIoU and friends at the model's own threshold, through the same code as `sam3studio eval`."""
    from ..evaluate import collect, score
    from ..train.data import CocoSegmentationData

    cases, _ = collect(seg, CocoSegmentationData(spec.quality_data), precision=split_mode(spec.precision)[0], limit=spec.quality_limit)
    return score(cases, seg.default_threshold, label=spec.precision).as_dict()


# --- plain transformers, as its documentation shows it ---------------------------------------------


def measure_transformers(spec: WorkerSpec) -> WorkerResult:
    """The baseline, as the transformers SAM3 documentation shows it: Sam3Processor +
    Sam3Model.from_pretrained, one text prompt per forward pass, the processor's own
    post-processing, fp32, no autocast. A new image with one prompt is one full forward; more
    prompts on the same image reuse its vision features, computed once with
    `get_vision_features` ("Efficient Multi-Prompt Inference on Single Image")."""
    from PIL import Image
    from transformers import Sam3Model, Sam3Processor

    from ..loading import resolve_model_folder

    folder, _ = resolve_model_folder(spec.model)
    _import_transformers()

    def load():
        return Sam3Processor.from_pretrained(folder), Sam3Model.from_pretrained(folder, use_safetensors=True).to(spec.device).eval()

    (processor, model), load_ms = _timed(spec.device, load)

    def postprocess(outputs, sizes) -> None:
        processor.post_process_instance_segmentation(outputs, threshold=0.5, mask_threshold=0.5, target_sizes=sizes)

    def segment(image, text: str) -> dict[str, float]:
        stages = {}
        inputs, stages["preprocess"] = _timed(spec.device, lambda: processor(images=image, text=text, return_tensors="pt").to(spec.device))
        with torch.no_grad():
            outputs, stages["forward"] = _timed(spec.device, lambda: model(**inputs))
        _, stages["postprocess"] = _timed(spec.device, lambda: postprocess(outputs, inputs.get("original_sizes").tolist()))
        return stages

    def encode(image):
        inputs = processor(images=image, return_tensors="pt").to(spec.device)
        with torch.no_grad():
            return model.get_vision_features(pixel_values=inputs.pixel_values), inputs.get("original_sizes").tolist()

    def on_encoded(vision_embeds, sizes, text: str) -> float:
        def run():
            text_inputs = processor(text=text, return_tensors="pt").to(spec.device)
            with torch.no_grad():
                outputs = model(vision_embeds=vision_embeds, **text_inputs)
            postprocess(outputs, sizes)

        return _timed(spec.device, run)[1]

    timings: dict[str, list[float]] = {}
    for index, path in enumerate(spec.images):
        image = Image.open(path).convert("RGB")
        first = segment(image, spec.prompts[0])
        (vision_embeds, sizes), encode_ms = _timed(spec.device, lambda: encode(image))
        many_ms = sum(on_encoded(vision_embeds, sizes, text) for text in spec.prompts)
        extra_ms = on_encoded(vision_embeds, sizes, spec.extra_prompt)
        del vision_embeds
        if index == 0:
            continue  # the warm-up
        _record(
            timings,
            new_image_1_prompt=sum(first.values()), forward_1=first["forward"], encode_image=encode_ms, one_more_prompt=extra_ms,
            new_image_n_prompts=encode_ms + many_ms, postprocess=first["postprocess"],
        )
    peak_rss_mb, cuda_peak_mb = _peak_memory(spec.device)
    return WorkerResult(BASELINE, "fp32", "fp32", load_ms / 1000, timings, peak_rss_mb, cuda_peak_mb)


def main(argv: list[str]) -> int:
    spec_path, result_path = argv
    spec = WorkerSpec(**json.loads(Path(spec_path).read_text()))
    cuda = torch.device(spec.device) if spec.device.startswith("cuda") else None  # "cuda:1" measures that GPU
    if cuda is not None:
        torch.cuda.reset_peak_memory_stats(cuda)
    measure = measure_transformers if spec.engine == BASELINE else measure_sam3studio
    result = measure(spec)
    Path(result_path).write_text(json.dumps(asdict(result), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
