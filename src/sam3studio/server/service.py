"""One model shared by every front end of the server: loading and warm-up in the background,
a bounded queue that fails fast when full, and per-request precision without reloading."""

from __future__ import annotations

import threading
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from .. import Result, Segmenter, load_segmenter
from ..images import load_image
from ..postprocess import select
from ..prompts import Sam3Warning
from ..types import RawPrediction


class Busy(RuntimeError):
    """The queue is full or the model did not free up in time; try again shortly."""

    retry_after_s = 2


class NotReady(RuntimeError):
    """The model is still loading (or failed to load)."""


@dataclass
class ServiceConfig:
    model: str = "demo"
    precision: str = "auto"
    device: str = "auto"
    offline: bool | None = None
    backend: str = "torch"  # or "onnxruntime", with precision int8 (see onnx_vision)
    max_waiting: int = 8  # requests admitted beyond the one running; more get 503
    wait_timeout_s: float = 60.0  # how long an admitted request may wait for the model
    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000


@dataclass
class Answer:
    result: Result
    image: np.ndarray
    raw: RawPrediction
    warnings: list[str] = field(default_factory=list)


class SegmentService:
    def __init__(self, config: ServiceConfig):
        self.config = config
        self.segmenter: Segmenter | None = None
        self.error: str | None = None
        self.ready = threading.Event()
        self._slots = threading.BoundedSemaphore(config.max_waiting + 1)
        self._model_lock = threading.Lock()
        # Post-processing runs outside the model lock, so that the next request's model pass can
        # start; two at a time keep both cores busy, and bound memory: each holds at most
        # postprocess.MAX_RESULT_MASK_BYTES (2 GB) of masks, plus up to ~1 GB upsampling or snapping
        # to edges at 40 MP (one mask snapped there: +0.5 GB).
        self._postprocessing = threading.BoundedSemaphore(2)

    def start(self) -> threading.Thread:
        """Load and warm up in the background; /readyz turns 200 when done."""
        thread = threading.Thread(target=self._load, name="sam3studio-load", daemon=True)
        thread.start()
        return thread

    def _load(self) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                segmenter = load_segmenter(self.config.model, precision=self.config.precision, device=self.config.device, offline=self.config.offline,
                                           backend=self.config.backend)
                warm = np.full((64, 64, 3), 127, dtype=np.uint8)
                segmenter.segment(warm, "warm up")
            self.segmenter = segmenter
            self.ready.set()
        except Exception as exc:  # reported by /readyz and every request; the process keeps serving
            self.error = f"{type(exc).__name__}: {exc}"

    def segment(self, image, prompts, *, threshold=None, refine=0, snap_edges=True, precision=None, name="upload") -> Answer:
        """Decode, queue, run (or reuse cached outputs) and post-process one request."""
        segmenter = self._require_ready()
        if not self._slots.acquire(blocking=False):  # before decoding: a flood must not decode in parallel
            raise Busy("The server is busy: too many requests are waiting. Retry in a moment.")
        try:
            rgb = load_image(image, name=name, max_pixels=self.config.max_pixels)
            if not self._model_lock.acquire(timeout=self.config.wait_timeout_s):
                raise Busy(f"The model stayed busy for {self.config.wait_timeout_s:.0f} s. Retry in a moment.")
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    raw = segmenter.predict(rgb, prompts, precision=precision)
            finally:
                self._model_lock.release()
        finally:
            self._slots.release()
        cut = segmenter.default_threshold if threshold is None else threshold
        started = time.perf_counter()
        with self._postprocessing:
            result = select(raw, threshold=cut, refine=refine, snap_edges=snap_edges)
        result.timings_ms["postprocess"] = (time.perf_counter() - started) * 1000
        # Only our own warnings (prompt language, precision changes); the catch is process-wide.
        # raw.image is the same picture (read-only), so a session holds it once.
        return Answer(result, raw.image, raw, [str(w.message) for w in caught if issubclass(w.category, Sam3Warning)])

    def reselect(self, answer: Answer, *, threshold: float, refine: int, snap_edges: bool = True) -> Answer:
        """A new threshold or refinement level on the same model outputs: no model run."""
        with self._postprocessing:
            result = select(answer.raw, threshold=threshold, refine=refine, snap_edges=snap_edges)
        return Answer(result, answer.image, answer.raw, answer.warnings)

    def _require_ready(self) -> Segmenter:
        if self.segmenter is None:
            raise NotReady(self.error or "The model is still loading; /readyz says when it is ready.")
        return self.segmenter
