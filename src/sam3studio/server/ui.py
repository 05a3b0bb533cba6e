"""The web UI (Gradio): upload, prompt, threshold, refinement, edge snapping, precision, and an
annotated result where clicking a region tells what it is. It calls the shared service directly."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
import time
import zipfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from .. import ImageError, OptionError, PrecisionError, PromptError
from ..export import result_document, safe_stem
from ..precision import Precision, resolve
from ..render import annotated_sections, instance_color, overlay
from .service import Answer, Busy, NotReady, SegmentService

# Shapes scenes the demo model knows (shapes.render_scene, seeds 500, 502 and 503, 360-560 px);
# a file's name after "__" is its example prompt.
EXAMPLES_DIR = Path(__file__).with_name("examples")
DOWNLOADS_DIR = Path(tempfile.gettempdir()) / "sam3studio-downloads"  # one known place, not scattered temp dirs
# Gradio serves a copy of each download from its own cache (cleaned by `delete_cache`), made as
# the handler returns; our originals are dead weight after that, so older ones are removed.
DOWNLOADS_KEEP_SECONDS = 600
SESSION_OUTPUTS_TTL_S = 3600
FAQ = """
**Tips.** SAM3 understands English prompts only. Separate several things with commas:
`person, car, blue bag`. Nothing found? Lower the detection threshold, or add a color or a
position word ("red car on the left"). Masks look off in bf16 or fp16? Try fp32.
"""
USER_ERRORS = (ImageError, PromptError, OptionError, PrecisionError, Busy, NotReady)

# Gradio's AnnotatedImage reports clicks on its legend only. This passes a click anywhere on the
# result image, as a position relative to the image, to a hidden textbox; Python then finds the
# region under it.
CLICK_JS = """
() => {
  document.addEventListener("click", (event) => {
    const container = event.target.closest("#result .image-container");
    const base = container && container.querySelector("img.base-image");
    const box = document.querySelector("#click-xy textarea, #click-xy input");
    if (!base || !box) return;
    const rect = base.getBoundingClientRect();
    const x = (event.clientX - rect.left) / rect.width, y = (event.clientY - rect.top) / rect.height;
    if (x < 0 || x > 1 || y < 0 || y > 1) return;
    box.value = x.toFixed(5) + "," + y.toFixed(5) + "," + Date.now();
    box.dispatchEvent(new Event("input", { bubbles: true }));
  });
}
"""
CSS = "#click-xy { display: none !important; }"


def mount_ui(app, service: SegmentService):
    """The UI at "/" of the FastAPI app, with the click handler; uploads capped like the REST API."""
    return gr.mount_gradio_app(app, build_ui(service), path="/", js=CLICK_JS, css=CSS, max_file_size=service.config.max_upload_bytes)


def precision_choices(service: SegmentService) -> list[tuple[str, str]]:
    """(shown text, value) for every mode, saying what it runs as on this device."""
    import torch

    device = service.config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    choices = []
    # int8 needs its own quantized weights, so it is offered alone when the server loaded it.
    modes = [Precision.INT8] if service.config.precision == Precision.INT8.value else [m for m in Precision if m is not Precision.INT8]
    for mode in modes:
        used = resolve(mode, device).used.value
        shown = mode.value if used == mode.value else f"{mode.value} (runs {used} here)"
        choices.append((shown, mode.value))
    return choices


def build_ui(service: SegmentService) -> gr.Blocks:
    # Files the UI hands out are kept an hour, then Gradio deletes them.
    with gr.Blocks(title="sam3studio", delete_cache=(600, 3600)) as ui:
        gr.Markdown("# sam3studio\nType what to find; get every match as a mask with a score.")
        with gr.Row():
            with gr.Column(scale=1):
                # A file path, decoded by sam3studio.images (format allow-list, pixel cap, 16-bit, EXIF),
                # not by Gradio.
                image = gr.Image(type="filepath", image_mode=None, label="Image", sources=["upload", "clipboard"], elem_id="input-image")
                prompts = gr.Textbox(label="What to find", placeholder="red car, dog, blue bag", elem_id="prompts")
                # A callable value is read at every page load: the model's calibrated threshold once it
                # has loaded, with no separate load event racing the user's first input.
                threshold = gr.Slider(0.0, 1.0, value=partial(_default_threshold, service), step=0.01, label="Detection threshold", elem_id="threshold")
                refine = gr.Slider(0, 3, value=0, step=1, label="Mask refinement", info="0 raw, 1 clean specks, 2 smooth edges, 3 one solid piece")
                snap_edges = gr.Checkbox(True, label="Masks follow the image's edges", info="Off: the model's coarse masks, stretched bilinearly",
                                         elem_id="snap-edges")
                precision = gr.Radio(precision_choices(service), value=service.config.precision, label="Precision",
                                     info="fp16 on a CPU runs as bf16 where the CPU has it, else fp32: CPUs compute fp16 slowly.")
                run = gr.Button("Segment", variant="primary", elem_id="segment")
                examples = sorted(EXAMPLES_DIR.glob("*.jpg"))
                if examples:
                    gr.Examples([[str(p), p.stem.split("__")[-1].replace("_", " ")] for p in examples], inputs=[image, prompts])
            with gr.Column(scale=1):
                result = gr.AnnotatedImage(label="Result (click a region)", elem_id="result")
                clicked = gr.Markdown(elem_id="clicked")
                click_xy = gr.Textbox(elem_id="click-xy", show_label=False, container=False)
                table = gr.Dataframe(headers=["#", "label", "score", "area (px)", "box x0,y0,x1,y1"], label="Instances", interactive=False)
                status = gr.Markdown(elem_id="status")
                downloads = gr.File(label="Downloads", file_count="multiple")
        gr.Markdown(FAQ)
        # The sliders re-select from the session's raw outputs (66 MB a prompt at SAM3's full
        # size), so a session idle for an hour gives them up; a slider then waits for a new run.
        answer = gr.State(time_to_live=SESSION_OUTPUTS_TTL_S)

        outputs = [result, table, status, downloads, answer, clicked]
        inputs = [image, prompts, threshold, refine, precision, snap_edges]  # the checkbox last: API calls keep their order
        # One queue for the model, shared with the REST API through the service's own limits.
        run.click(partial(_segment, service), inputs, outputs, api_name="segment", concurrency_id="model", concurrency_limit=1)
        prompts.submit(partial(_segment, service), inputs, outputs, api_name=False, concurrency_id="model", concurrency_limit=1)
        reselect = partial(_reselect, service), [answer, threshold, refine, snap_edges], outputs
        threshold.release(*reselect, api_name="reselect")
        refine.release(*reselect, api_name=False)
        snap_edges.input(*reselect, api_name=False)
        result.select(_describe_legend_click, [answer], clicked, api_name=False)
        click_xy.change(_describe_region, [answer, click_xy], clicked, api_name="describe_region")
    ui.queue(max_size=service.config.max_waiting)  # a full queue refuses at once, like the REST API
    return ui


def _default_threshold(service: SegmentService) -> float:
    return service.segmenter.default_threshold if service.segmenter else 0.5


@contextlib.contextmanager
def _shown_to_the_user() -> Iterator[None]:
    """Errors in what the user gave become Gradio's message box, with our message."""
    try:
        yield
    except USER_ERRORS as exc:
        raise gr.Error(str(exc)) from None


def _segment(service: SegmentService, image, prompts, threshold, refine, precision, snap_edges=True):
    if image is None:
        raise gr.Error("Upload an image first.")
    with _shown_to_the_user():
        answer = service.segment(image, prompts, threshold=threshold, refine=int(refine), snap_edges=bool(snap_edges), precision=precision,
                                 name=Path(image).name)
    return _show(answer)


def _reselect(service: SegmentService, answer: Answer | None, threshold, refine, snap_edges=True):
    if answer is None:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
    with _shown_to_the_user():  # a threshold near 0 on a large image can keep too many masks to hold
        answer = service.reselect(answer, threshold=threshold, refine=int(refine), snap_edges=bool(snap_edges))
    return _show(answer)


def _show(answer: Answer):
    image, sections = annotated_sections(answer.image, answer.result)
    names = [name for _, name in sections]
    colors = {name: "#%02x%02x%02x" % instance_color(i) for i, name in enumerate(names)}
    rows = [[i + 1, inst.label, round(inst.score, 3), inst.area, ", ".join(f"{v:.0f}" for v in inst.box)] for i, inst in enumerate(answer.result.instances)]
    return (
        gr.AnnotatedImage(value=(image, sections), color_map=colors),
        rows,
        _status(answer),
        _downloads(answer),
        answer,
        f"{len(names)} found. Click a region to see what it is." if names else "Nothing found: lower the threshold or rephrase.",
    )


def _status(answer: Answer) -> str:
    r = answer.result
    used = r.precision_used + (" after an fp32 fallback (half precision gave non-finite values)" if r.fallback_fp32 else "")
    timings = ", ".join(f"{k} {v:.0f} ms" for k, v in r.timings_ms.items())
    notes = "".join(f"\n\n*{w}*" for w in answer.warnings)
    return f"Precision asked **{r.precision_requested}**, used **{used}**. {timings}.{notes}"


def _describe_legend_click(answer: Answer | None, event: gr.SelectData) -> str:
    if answer is None or event.index is None or not 0 <= int(event.index) < len(answer.result.instances):
        return ""
    return _describe(answer, int(event.index))


def _describe_region(answer: Answer | None, position: str) -> str:
    """"x,y[,stamp]" relative to the image -> the best-scoring region under that point."""
    if answer is None:
        return ""
    try:
        x, y = (float(v) for v in position.split(",")[:2])
    except ValueError:
        return ""
    if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):  # also refuses NaN; a negative index would wrap around
        return ""
    height, width = answer.image.shape[:2]
    col, row = min(int(x * width), width - 1), min(int(y * height), height - 1)
    hits = [i for i, inst in enumerate(answer.result.instances) if inst.mask[row, col]]
    if not hits:
        return "No region there."
    return _describe(answer, max(hits, key=lambda i: answer.result.instances[i].score))


def _describe(answer: Answer, index: int) -> str:
    inst = answer.result.instances[index]
    return f"**{index + 1}. {inst.label}**, score **{inst.score:.2f}** ({inst.area} px)"


def _remove_old_downloads(older_than: float) -> None:
    for folder in DOWNLOADS_DIR.glob("result-*"):
        with contextlib.suppress(OSError):  # another worker may be removing it too
            if folder.stat().st_mtime < older_than:
                shutil.rmtree(folder)


def _downloads(answer: Answer) -> list[str]:
    """JSON, masks as a zip of PNGs, and the overlay, in a fresh temporary folder."""
    DOWNLOADS_DIR.mkdir(parents=True, exist_ok=True)
    _remove_old_downloads(time.time() - DOWNLOADS_KEEP_SECONDS)
    folder = Path(tempfile.mkdtemp(prefix="result-", dir=DOWNLOADS_DIR))
    (folder / "result.json").write_text(json.dumps(result_document(answer.result, "upload")))
    with zipfile.ZipFile(folder / "masks.zip", "w") as archive:
        for i, inst in enumerate(answer.result.instances):
            buffer = io.BytesIO()
            Image.fromarray(inst.mask.astype(np.uint8) * 255).save(buffer, format="PNG")
            archive.writestr(f"{i + 1:03d}_{safe_stem(inst.label)}.png", buffer.getvalue())
    Image.fromarray(overlay(answer.image, answer.result)).save(folder / "overlay.png")
    return [str(folder / "result.json"), str(folder / "masks.zip"), str(folder / "overlay.png")]
