"""The `sam3studio` command: segment, download, info, serve, train, eval, bench. A thin shell over the library."""

from __future__ import annotations

import dataclasses
import glob
import os
import platform
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

app = typer.Typer(
    name="sam3studio",
    help="Text-prompted segmentation with SAM3: every object matching 'red car, dog' as a mask with a score.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".mpo"}

PRECISION_HELP = (
    "fp32 | fp16 | bf16 | auto. auto = fp16 on CUDA, bf16 on a CPU where bf16 beats fp32 "
    "(e.g. AMD Zen 4), else fp32. On a CPU without native bf16 (e.g. AMD Zen 3, AVX2 only) an "
    "explicit bf16 or fp16 runs fp32 instead, with a warning, since it would be 6-100x slower; "
    "on a CPU with native bf16, fp16 runs as bf16. --force-precision runs exactly what you ask. "
    "int8 (experimental, CPU): dynamic int8 Linear layers, chosen when the model is loaded."
)
VIEWS_HELP = (
    "Test-time views: 1, 2 or 4 runs of the model on the image and its mirror images, answers averaged (better scores, "
    "that many times the work). Default: the model's own; the demo model's is 4, any other model's 1."
)
BACKEND_HELP = (
    "What encodes images: torch, or onnxruntime with --precision int8 (CPU; needs the onnx extra: onnxruntime, onnx, onnxscript). "
    "onnxruntime encoded full-size images ~20-30% faster than torch int8 on a Zen 4, at 2.5x its peak memory; the first use of "
    "a checkpoint exports it (full size: ~2 min and ~10 GB of memory, once)."
)


class CliError(Exception):
    """An error to print as one line and exit with status 2."""


@app.command()
def segment(
    inputs: Annotated[list[str], typer.Argument(help="Image files, folders or glob patterns ('photos/*.jpg').")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="What to find, comma-separated: 'red car, dog'. 'dog:0.3' sets that prompt's threshold.")] = "",
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder; nothing is written outside it.")] = Path("out"),
    model: Annotated[str, typer.Option(help="Hub id (facebook/sam3), local folder, or 'demo'.", envvar="SAM3_MODEL")] = "demo",
    threshold: Annotated[Optional[float], typer.Option(help="Keep objects scoring at least this (0-1). Default: the model's own calibrated threshold, else 0.5.")] = None,
    mask_threshold: Annotated[float, typer.Option(help="Pixel probability above which a pixel is in the mask.")] = 0.5,
    refine: Annotated[int, typer.Option(help="Mask refinement: 0 raw, 1 clean specks and pinholes, 2 also smooth edges, 3 also one solid piece.")] = 0,
    nms: Annotated[Optional[float], typer.Option(help="Drop an object overlapping a better-scoring one by this IoU or more (same object found by two prompts).")] = None,
    snap_edges: Annotated[bool, typer.Option(help="Upsample masks along the image's edges (guided filter); --no-snap-edges: plain bilinear, as transformers does.")] = True,
    precision: Annotated[str, typer.Option(help=PRECISION_HELP, envvar="SAM3_PRECISION")] = "auto",
    force_precision: Annotated[bool, typer.Option("--force-precision", help="Run the precision asked for even where it is slow.")] = False,
    weights_dtype: Annotated[str, typer.Option(help="auto: half precision when --precision auto runs bf16/fp16, else fp32; fp32; or bf16/fp16 (half the memory; needs that precision).")] = "auto",
    backend: Annotated[str, typer.Option(help=BACKEND_HELP, envvar="SAM3_BACKEND")] = "torch",
    box: Annotated[Optional[list[str]], typer.Option(help="Exemplar box 'x0,y0,x1,y1' in pixels (repeatable): find objects like it.")] = None,
    negative_box: Annotated[Optional[list[str]], typer.Option(help="Box 'x0,y0,x1,y1' of something NOT to match (repeatable).")] = None,
    output_format: Annotated[str, typer.Option("--format", help="Comma-separated: json (COCO RLE), png (masks + overlay), polygons, coco (one dataset file).")] = "json",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    offline: Annotated[bool, typer.Option("--offline", help="Never touch the network; use the local cache (also HF_HUB_OFFLINE=1).")] = False,
    views: Annotated[Optional[int], typer.Option(help=VIEWS_HELP)] = None,
) -> None:
    """Segment images from text prompts (and/or exemplar boxes); write JSON/PNG/polygons/COCO to --out."""
    from . import export, load_image, load_segmenter
    from .postprocess import check_options
    from .prompts import attach_boxes, parse_prompts

    formats = _parse_formats(output_format)
    check_options(0.5 if threshold is None else threshold, mask_threshold, refine, nms)
    boxes, negatives = _parse_boxes(box or []), _parse_boxes(negative_box or [])
    all_boxes = boxes + negatives
    all_labels = [1] * len(boxes) + [0] * len(negatives)
    with warnings.catch_warnings():  # warnings are shown once, when the prompts run
        warnings.simplefilter("ignore")  # fail on bad prompts and boxes before loading the model
        attach_boxes(parse_prompts(prompt, boxes_given=bool(all_boxes)), all_boxes, all_labels)
    files = _expand_inputs(inputs)
    _make_output_folder(out)
    seg = load_segmenter(
        model, precision=precision, device=device, weights_dtype=weights_dtype, force_precision=force_precision, offline=offline or None,
        backend=backend, views=views,
    )
    coco = export.CocoDatasetWriter() if "coco" in formats else None
    failures: list[str] = []
    stems = {Path(export.CocoDatasetWriter.FILE_NAME).stem}  # no image's JSON may overwrite the dataset file
    with _progress(len(files)) as progress:
        task = progress.add_task("segmenting", total=len(files))
        for file in files:
            try:
                image = load_image(file)
                result = seg.segment(
                    image, prompt, threshold=threshold, mask_threshold=mask_threshold, refine=refine, nms_iou=nms, snap_edges=snap_edges,
                    boxes=all_boxes or None, box_labels=all_labels or None,
                )
                stem = _unique_stem(export.safe_stem(file.stem), stems)
                export.write_result(result, image, file.name, out, stem, formats)
                if coco is not None:
                    coco.add(result, file.name)
                _report(result, file, quiet=len(files) > 1)
            except Exception as exc:  # noqa: BLE001 - one bad image never stops the run; its error is reported
                message = str(exc) if isinstance(exc, (ValueError, OSError)) else f"{type(exc).__name__}: {exc}"
                failures.append(f"{file}: {message}")
                console.print(f"[red]skipped[/red] {message}")
            progress.advance(task)
    if coco is not None:
        coco.write(out)
    console.print(f"{len(files) - len(failures)} of {len(files)} images segmented; results in {out.resolve()}")
    if failures:
        raise typer.Exit(1)


@app.command()
def download(
    model: Annotated[str, typer.Argument(help="Hub id, e.g. facebook/sam3 (gated: request access on its page first).")] = "facebook/sam3",
    revision: Annotated[Optional[str], typer.Option(help="Branch, tag or commit.")] = None,
) -> None:
    """Fetch a model into the local Hugging Face cache once, so later runs work offline."""
    from .loading import download_model

    folder = download_model(model, revision=revision, token=os.environ.get("HF_TOKEN"))
    console.print(f"{model} is cached in {folder}; run with --offline or HF_HUB_OFFLINE=1 from now on.")


@app.command()
def info() -> None:
    """Show the device, its bf16 support, what each precision runs as, versions and the model cache."""
    import torch
    import transformers

    from .loading import DEMO_MODEL_DIR, cache_dir, cached_models
    from .precision import Precision, cpu_info, resolve

    cpu = cpu_info()
    table = Table(show_header=False, box=None)
    table.add_row("sam3studio", _version())
    table.add_row("python / torch / transformers", f"{platform.python_version()} / {torch.__version__} / {transformers.__version__}")
    table.add_row("cuda", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available")
    table.add_row("cpu", f"{cpu.model}, {torch.get_num_threads()} threads")
    table.add_row("cpu bf16 flags", ", ".join(cpu.bf16_flags) or "none")
    speeds = f" (matmul fp32 {cpu.fp32_gflops:.0f} vs bf16 {cpu.bf16_gflops:.0f} GFLOP/s)" if cpu.fp32_gflops else ""
    table.add_row("native bf16", f"{'yes' if cpu.native_bf16 else 'no'}, faster than fp32: {'yes' if cpu.bf16_faster else 'no'}{speeds} [{cpu.source}]")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for mode in Precision:
        plan = resolve(mode, device)
        table.add_row(f"--precision {mode.value}", f"runs {plan.used.value} on {device}" + (f" ({plan.reason})" if plan.reason else ""))
    table.add_row("--backend onnxruntime", _onnx_backend_state())
    table.add_row("model cache", str(cache_dir()))
    table.add_row("cached SAM models", ", ".join(cached_models()) or "none")
    table.add_row("demo model", str(DEMO_MODEL_DIR) if (DEMO_MODEL_DIR / "config.json").is_file() else "not installed yet")
    Console().print(table)


def _onnx_backend_state() -> str:
    from .onnx_vision import OnnxUnavailableError, cache_root, require_onnx

    try:
        require_onnx()
    except OnnxUnavailableError as err:
        return f"unavailable: {err}"
    import onnxruntime

    return f"available with --precision int8 on the CPU (onnxruntime {onnxruntime.__version__}); exported graphs in {cache_root()}"


@app.command()
def serve(
    model: Annotated[str, typer.Option(help="Hub id, folder or 'demo'.", envvar="SAM3_MODEL")] = "demo",
    precision: Annotated[str, typer.Option(help=PRECISION_HELP, envvar="SAM3_PRECISION")] = "auto",
    backend: Annotated[str, typer.Option(help=BACKEND_HELP, envvar="SAM3_BACKEND")] = "torch",
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 exposes it to the network.", envvar="SAM3_HOST")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.", envvar="SAM3_PORT")] = 7860,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    offline: Annotated[bool, typer.Option("--offline", envvar="SAM3_OFFLINE", help="Never touch the network for weights.")] = False,
) -> None:
    """Serve the web UI at / and the REST API at /v1 (docs at /docs) from one process."""
    import uvicorn

    from .server.app import create_app
    from .server.service import SegmentService, ServiceConfig
    from .server.ui import mount_ui

    service = SegmentService(ServiceConfig(model=model, precision=precision, device=device, offline=offline or None, backend=backend))
    service.start()
    app = mount_ui(create_app(service), service)
    console.print(f"serving {model} at http://{host}:{port} (REST docs at /docs; ready when /readyz says so)")
    # A client that never finishes its request must not hold a stopping server (and its model) open.
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)


@app.command()
def train(
    data: Annotated[Optional[Path], typer.Option(help="COCO dataset folder: annotations.json + images/ (category names become prompts).")] = None,
    out: Annotated[Path, typer.Option(help="Run folder: checkpoint/, metrics.json, loss_curve.png. An existing run resumes.")] = Path("runs/train"),
    preset: Annotated[Optional[str], typer.Option(help="'demo': render the shapes data, train the demo model from scratch, calibrate it and install it as --model demo.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Hub id or folder to fine-tune; default: a fresh demo-size model.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps in all (default 2000); with --preset demo, the length of its second stage.")] = None,
    precision: Annotated[str, typer.Option(help="auto | fp32 | bf16 | fp16, resolved as for inference: bf16 autocast only where this CPU runs it fast; fp16 with a GradScaler on CUDA.")] = "auto",
    force_precision: Annotated[bool, typer.Option("--force-precision", help="Train in the precision asked for even where it is slow.")] = False,
    freeze: Annotated[Optional[str], typer.Option(help="Comma-separated parts to keep fixed: vision, text.")] = None,
    images_per_step: Annotated[Optional[int], typer.Option(help="Images per optimizer step (each with all its prompts); default 4.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate (AdamW, warmup then cosine); default 3e-4.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for data order, augmentation and init; default 0.")] = None,
    image_size: Annotated[Optional[int], typer.Option(min=14, help="Input size in pixels, a multiple of 14; default: the model's own (336 for a fresh demo-size model). "
                                                           "A smaller one trains a large model faster and loses small objects.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
) -> None:
    """Fine-tune SAM3 (or train a small one) on a COCO instance-segmentation dataset, in mixed precision."""
    from .train.loop import TrainConfig
    from .train.resolution import PATCH

    if preset not in (None, "demo"):
        raise CliError(f"Unknown --preset {preset!r}: the only preset is 'demo'.")
    if preset == "demo":
        from .train.presets import demo_training_stages, prepare_demo_data

        # A fixed recipe: the options it would ignore are refused, not dropped in silence.
        recipe_options = {"--data": data, "--model": model, "--freeze": freeze, "--images-per-step": images_per_step, "--lr": lr,
                          "--seed": seed, "--image-size": image_size}
        given = [name for name, value in recipe_options.items() if value is not None]
        if given:
            raise CliError(f"--preset demo trains its own fixed recipe; {', '.join(given)} cannot change it "
                           "(only --out, --steps, --device, --precision and --force-precision apply).")
        console.print(f"rendering the shapes datasets under {out / 'data'} (once)")
        splits = prepare_demo_data(out / "data")
        stages = [dataclasses.replace(stage, device=device, precision=precision, force_precision=force_precision)
                  for stage in demo_training_stages(str(out), str(splits["train"]), steps)]
    else:
        if data is None:
            raise CliError("Give --data (a COCO dataset folder) or --preset demo.")
        if image_size is not None and image_size % PATCH:
            raise CliError(f"--image-size {image_size} is not a multiple of the model's {PATCH}-pixel patch.")
        # Options left unset take TrainConfig's defaults.
        options = {"images_per_step": images_per_step, "lr": lr, "seed": seed, "image_size": image_size, "steps": steps,
                   "freeze": tuple(p.strip() for p in freeze.split(",") if p.strip()) if freeze is not None else None}
        stages = [TrainConfig(data=str(data), out=str(out), model=model, precision=precision, force_precision=force_precision, device=device,
                              **{name: value for name, value in options.items() if value is not None})]
    trainers = [_train_stage(config, f"stage {n} of {len(stages)}: " if len(stages) > 1 else "") for n, config in enumerate(stages, start=1)]
    if preset == "demo":
        from .loading import DEMO_MODEL_DIR
        from .train.presets import export_demo_model, training_notes

        export_demo_model(Path(stages[-1].out) / "checkpoint", splits, DEMO_MODEL_DIR, notes=training_notes(trainers))
        console.print(f"installed the demo model in {DEMO_MODEL_DIR}; its card: {DEMO_MODEL_DIR / 'README.md'}")


def _train_stage(config, label: str):
    """Train (or resume, or find finished) one run folder, with a progress bar; exits 130 when
    stopped by Ctrl-C or SIGTERM, after the checkpoint is saved."""
    from .train.loop import Trainer, load_for_training

    model_obj, processor = load_for_training(config)
    trainer = Trainer(config, model_obj, processor)
    if trainer.resume():
        console.print(f"{label}resuming {config.out} at step {trainer.step}")
    console.print(f"{label}training on {trainer.plan.device} in {trainer.plan.used.value}" + (f" ({trainer.plan.reason})" if trainer.plan.reason else ""))
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console)
    with progress:
        task = progress.add_task("training", total=config.steps, completed=trainer.step)

        def show(log) -> None:
            progress.update(task, completed=log.step, description=f"loss {log.losses['total']:.3f}  {log.seconds:.2f} s/step")

        finished = trainer.run(show)
    if not finished:
        console.print(f"stopped at step {trainer.step}; run the same command again to resume")
        raise typer.Exit(130)
    console.print(f"{label}done: {config.steps} steps; checkpoint in {Path(config.out) / 'checkpoint'}")
    return trainer


@app.command("eval")
def evaluate_model(
    data: Annotated[Path, typer.Option(help="COCO dataset folder with ground truth.")],
    model: Annotated[str, typer.Option(help="Hub id, folder or 'demo'.")] = "demo",
    precision: Annotated[str, typer.Option(help="Comma-separated modes to compare, e.g. fp32,bf16.")] = "fp32",
    force_precision: Annotated[bool, typer.Option("--force-precision", help="Measure each mode as asked even where this CPU would run fp32 instead.")] = False,
    threshold: Annotated[Optional[float], typer.Option(help="Score threshold; default: the model's own.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Only the first N images.")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the table as JSON here.")] = None,
    views: Annotated[Optional[int], typer.Option(help=VIEWS_HELP)] = None,
) -> None:
    """mIoU, precision and recall at IoU 0.5, and false positives on absent-object prompts, per precision mode."""
    import json

    from . import load_segmenter
    from .evaluate import collect, score
    from .postprocess import check_options
    from .precision import Precision
    from .train.data import CocoSegmentationData

    modes = [Precision.parse(m.strip()) for m in precision.split(",") if m.strip()]  # every mode checked before any runs
    if threshold is not None:
        check_options(threshold, 0.5, 0, None)
    if limit is not None and limit < 1:
        raise CliError(f"--limit must be 1 or more; got {limit}.")
    dataset = CocoSegmentationData(data)
    # int8 quantizes the weights when the model loads; every other mode runs on fp32 weights.
    load_as = {mode: "int8" if mode is Precision.INT8 else "fp32" for mode in modes}
    segmenters = {kind: load_segmenter(model, precision=kind, force_precision=force_precision, views=views) for kind in dict.fromkeys(load_as.values())}
    cut = next(iter(segmenters.values())).default_threshold if threshold is None else threshold
    reports = []
    for mode in modes:
        seg = segmenters[load_as[mode]]
        cases, seconds = collect(seg, dataset, precision=mode.value, limit=limit)
        report = score(cases, cut, label=f"{mode.value} (ran {cases[0].raw.precision_used})" if cases else mode.value)
        report.seconds = seconds
        reports.append(report)
    table = Table(title=f"{model} on {data} ({reports[0].images if reports else 0} images, threshold {cut})")
    for column in ("precision", "mIoU", "P@0.5", "R@0.5", "FP rate (absent)", "duplicates", "seconds"):
        table.add_column(column)
    for r in reports:
        table.add_row(r.precision, f"{r.miou:.4f}", f"{r.precision_at_50:.3f}", f"{r.recall_at_50:.3f}", f"{r.negative_fp_rate:.3f}", str(r.duplicates), f"{r.seconds:.1f}")
    Console().print(table)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps([r.as_dict() for r in reports], indent=1))


@app.command()
def bench(
    model: Annotated[str, typer.Option(help="'full-random' (full-size SAM3, random weights: speed and memory only), 'demo', or a folder / hub id.")] = "demo",
    precision: Annotated[str, typer.Option(help="Comma-separated modes, each measured in a fresh process: fp32,bf16,fp16,auto,int8, and int8+onnxruntime (images encoded by ONNX Runtime).")] = "fp32,bf16,auto",
    size: Annotated[int, typer.Option(help="Side of the square test images, in pixels.")] = 1008,
    images: Annotated[int, typer.Option(help="Measured images per mode (after one warm-up image).")] = 3,
    prompts: Annotated[int, typer.Option(help="Prompts in the many-prompt case (the one-prompt case is always measured).")] = 10,
    out: Annotated[Path, typer.Option(help="Folder for report.md, results.json, chart.png (and the full-random checkpoint).")] = Path("bench-out"),
    baseline: Annotated[bool, typer.Option(help="Also measure plain transformers fp32, the baseline of every ratio.")] = True,
    quality_data: Annotated[Optional[Path], typer.Option(help="COCO dataset for mIoU; default for 'demo': synthetic scenes.")] = None,
    quality_images: Annotated[int, typer.Option(help="Images of the quality set to score.")] = 50,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    force_precision: Annotated[bool, typer.Option("--force-precision", help="Measure each mode as asked even where this CPU would run fp32 instead.")] = False,
) -> None:
    """Latency, peak memory, mIoU and mask agreement per precision mode, beside plain transformers."""
    from .bench import BenchConfig, BenchError, run_bench

    modes = tuple(m.strip() for m in precision.split(",") if m.strip())
    config = BenchConfig(out=str(out), model=model, precisions=modes, size=size, images=images, prompts=prompts, baseline=baseline,
                         device=device, force_precision=force_precision, quality_data=str(quality_data) if quality_data else None,
                         quality_images=quality_images)
    try:
        run_bench(config, on_progress=lambda text: console.print(text))
    except BenchError as exc:
        raise CliError(str(exc)) from None
    print((out / "report.md").read_text(encoding="utf-8"))
    console.print(f"results in {out}: report.md, results.json, chart.png")


def _version() -> str:
    from . import __version__

    return __version__


def _parse_formats(text: str) -> list[str]:
    from .export import FORMATS

    formats = [f.strip().lower() for f in text.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise CliError(f"Unknown --format {', '.join(unknown) or text!r}: choose from {', '.join(FORMATS)}.")
    return formats


def _parse_boxes(texts: list[str]) -> list[list[float]]:
    boxes = []
    for text in texts:
        try:
            values = [float(v) for v in text.replace(" ", "").split(",")]
        except ValueError:
            values = []
        if len(values) != 4:
            raise CliError(f"Box {text!r} must be four numbers 'x0,y0,x1,y1'.")
        boxes.append(values)
    return boxes


def _expand_inputs(inputs: list[str]) -> list[Path]:
    """Files as given; folders -> their images (sorted); globs -> matches. Missing -> error."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if _is_image_file(p))
        elif path.exists() or not glob.has_magic(item):
            files.append(path)  # a missing file is reported per image, like a broken one
        else:
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True) if _is_image_file(Path(p)))
            if not matches:
                raise CliError(f"No image file matches {item!r}.")
            files += matches
    if not files:
        raise CliError("No images to segment: the folders given hold no image files.")
    return list(dict.fromkeys(files))


def _is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def _make_output_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"Cannot use {out} as the output folder: {exc.strerror or exc}.") from None


def _unique_stem(stem: str, taken: set[str]) -> str:
    """`stem`, or `stem_1`, `stem_2`...: compared without case, since on macOS and Windows
    "Cat.json" and "cat.json" are one file."""
    candidate, n = stem, 1
    while candidate.lower() in taken:
        candidate, n = f"{stem}_{n}", n + 1
    taken.add(candidate.lower())
    return candidate


def _progress(total: int) -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=console, disable=total <= 1 or not console.is_terminal and not os.environ.get("SAM3_PROGRESS"),
    )


def _report(result, file: Path, *, quiet: bool) -> None:
    found = ", ".join(f"{i.label} {i.score:.2f}" for i in result.instances) or "nothing above the threshold"
    if quiet:
        return
    timing = result.timings_ms.get("total", 0.0)
    console.print(f"{file.name}: {len(result.instances)} found ({found}) in {timing:.0f} ms, {result.precision_used}")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    console.print(f"[yellow]warning:[/yellow] {message}")


def main() -> None:
    """Entry point: run the app and turn the library's errors into one-line messages."""
    from . import ImageError, ModelLoadError, OptionError, PrecisionError, PromptError
    from .train.data import DataError
    from .train.loop import TrainingDiverged

    warnings.showwarning = _show_warning
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        app()
    except (CliError, ModelLoadError, PrecisionError, PromptError, OptionError, ImageError, DataError, TrainingDiverged) as exc:
        from rich.markup import escape

        console.print(f"[red]error:[/red] {escape(str(exc))}")  # messages quote user text, brackets and all
        sys.exit(2)


if __name__ == "__main__":
    main()
