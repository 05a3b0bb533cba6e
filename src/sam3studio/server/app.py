"""The FastAPI app: REST endpoints over the shared `SegmentService`, with the Gradio UI mounted
at "/" in the same process (the UI calls the service directly, never the REST API)."""

from __future__ import annotations

import platform

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from .. import ImageError, OptionError, PrecisionError, PromptError, __version__
from ..export import result_document
from ..images import ImageTooLarge, UnsupportedImage
from .service import Busy, NotReady, SegmentService

ERROR_STATUS = [  # most specific first
    (ImageTooLarge, 413),
    (UnsupportedImage, 415),
    (ImageError, 400),
    (PromptError, 400),
    (OptionError, 400),
    (PrecisionError, 400),
    (Busy, 503),
    (NotReady, 503),
]


def create_app(service: SegmentService) -> FastAPI:
    app = FastAPI(
        title="sam3studio",
        version=__version__,
        description="Text-prompted segmentation with SAM3: every object matching each prompt, as masks with scores.",
    )
    app.add_middleware(UploadLimit, max_bytes=service.config.max_upload_bytes)

    for error_type, status in ERROR_STATUS:
        app.add_exception_handler(error_type, _handler(status))
    app.add_exception_handler(RequestValidationError, _malformed)

    @app.get("/healthz")
    def healthz() -> dict:
        """The process is alive (the model may still be loading)."""
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        """200 once the model is loaded and has run one warm-up pass; 503 before (or if it failed)."""
        if service.ready.is_set():
            return JSONResponse({"status": "ready", "model": service.config.model})
        status = "failed" if service.error else "loading"
        return JSONResponse({"status": status, "error": service.error}, status_code=503, headers={"Retry-After": str(Busy.retry_after_s)})

    @app.get("/v1/info")
    def info() -> dict:
        """Model, device, the precision modes this device offers, and versions."""
        import torch
        import transformers

        from ..precision import cpu_info

        segmenter = service.segmenter
        device = str(segmenter.device) if segmenter else "loading"
        modes = _offered_precisions(segmenter) if segmenter else {}
        return {
            "model": service.config.model,
            "ready": service.ready.is_set(),
            "device": device,
            "cpu": cpu_info().model,
            "precisions": modes,  # what each mode a request may ask for runs as here (none while loading)
            "default_threshold": segmenter.default_threshold if segmenter else None,
            "test_time_views": len(segmenter.views) if segmenter else None,  # passes per image (sam3studio.views)
            "versions": {"sam3studio": __version__, "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()},
        }

    @app.post("/v1/segment")
    def segment(
        image: UploadFile = File(..., description="The image: JPEG, PNG, WebP, BMP, TIFF or GIF."),
        prompts: str = Form("", description='What to find, comma-separated: "red car, dog"; "dog:0.3" sets one threshold.'),
        # Ranges are checked by the core (check_options), as for every front end: a 400 naming the option.
        threshold: float | None = Form(None, description="Score threshold between 0 and 1; default: the model's own."),
        refine: int = Form(0, description="Mask refinement 0-3."),
        snap_edges: bool = Form(True, description="Upsample masks along the image's edges; false: plain bilinear."),
        precision: str | None = Form(None, description="fp32, fp16, bf16 or auto; default: the server's."),
        format: str = Form("json", description="json (COCO RLE masks) or polygons."),
    ) -> dict:
        """Segment one image; answers the same JSON document the CLI writes."""
        if format not in ("json", "polygons"):
            raise OptionError(f"format must be json or polygons; got {format!r}.")
        data = image.file.read()
        answer = service.segment(
            data, prompts, threshold=threshold, refine=refine, snap_edges=snap_edges, precision=precision, name=image.filename or "upload"
        )
        document = result_document(answer.result, image.filename or "upload", polygons=format == "polygons")
        document["warnings"] = answer.warnings
        return document

    return app


def _offered_precisions(segmenter) -> dict[str, str]:
    """{mode: what it runs as here} for the modes the loaded model takes per request: int8 and
    the float modes need different weights, so a server offers one kind, as the UI does."""
    from ..precision import Precision

    offered = {}
    for mode in Precision:
        try:
            offered[mode.value] = segmenter.plan_for(mode).used.value
        except PrecisionError:
            continue
    return offered


def _handler(status: int):
    async def handle(request: Request, exc: Exception) -> JSONResponse:
        headers = {"Retry-After": str(Busy.retry_after_s)} if status == 503 else None
        return JSONResponse({"error": type(exc).__name__, "detail": str(exc)}, status_code=status, headers=headers)

    return handle


async def _malformed(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 in the shape of every other error, naming the fields but never echoing their values
    (FastAPI's own answer sends back what was given, the bytes of an upload included)."""
    problems = "; ".join(f"{'.'.join(str(part) for part in error['loc'][1:]) or 'request'}: {error['msg']}" for error in exc.errors())
    return JSONResponse({"error": "MalformedRequest", "detail": problems}, status_code=422)


class UploadLimit:
    """Refuse request bodies over `max_bytes` with 413 before they are parsed or stored
    (FastAPI itself sets no limit): by Content-Length when given, else by reading the body up
    to the limit first. Reading it whole (it is bounded) means a chunked upload that runs over
    gets a 413 too, not whatever error the form parser would make of a cut-off body."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit():
            if int(declared) > self.max_bytes:
                return await self._too_large(send)
            return await self.app(scope, receive, send)
        messages, seen = [], 0
        while True:
            message = await receive()
            messages.append(message)
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                return await self._too_large(send)
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send) -> None:
        body = b'{"error":"TooLarge","detail":"The upload is larger than the server accepts (%d MB)."}' % (self.max_bytes // 2**20)
        await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

