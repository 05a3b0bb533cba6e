"""The Segmenter: encode an image once, then answer any number of prompts against it.

    seg = load_segmenter("facebook/sam3", precision="auto")
    result = seg.segment("photo.jpg", "red car, dog", threshold=0.5)

Image encodings and text embeddings are cached (LRU), and all prompts of a call run in one
batched forward pass of the detector against the cached encoding.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from . import postprocess
from .allocator import reuse_freed_memory
from .images import ImageInput, load_image
from .loading import LoadedModel, load_model
from .onnx_vision import OnnxVisionEncoder, require_onnx
from .precision import (
    Precision,
    PrecisionError,
    PrecisionPlan,
    all_finite,
    cast_weights,
    keep_sensitive_modules_fp32,
    quantize_int8,
    resolve,
)
from .prompts import PromptsInput, Sam3Warning, attach_boxes, fit_boxes_to_image, parse_prompts
from .speedups import FirstSelfAttentionMemo, FoldedMaskHead, PixelDecoderSkips, install_complex_rope
from .types import Prompt, RawPrediction, Result
from .views import first_views, merge_views

MAX_TEXT_TOKENS = 32  # SAM3's text encoder has 32 positions, start and end tokens included
BOX_ONLY_TEXT = "visual"  # the text transformers pairs with box-only prompts
# Activation memory one detection pass may take (see Segmenter._prompts_per_pass).
PASS_BUDGET_BYTES = 1_200_000_000
MAX_PROMPTS_PER_PASS = 64
# Raw outputs kept for reuse: about 15 prompts' worth at full size, however they were batched.
PREDICTION_CACHE_BYTES = 1_000_000_000
BACKENDS = ("torch", "onnxruntime")  # what encodes images; see onnx_vision for when the second pays


class LruCache:
    """A small least-recently-used map, bounded by count and optionally by bytes; the
    Segmenter's lock guards it."""

    def __init__(self, capacity: int, *, max_bytes: int | None = None, size_of: Callable[[object], int] = lambda _: 0):
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.size_of = size_of
        self._items: OrderedDict[Hashable, tuple[object, int]] = OrderedDict()
        self._bytes = 0

    def get(self, key: Hashable):
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key][0]
        return None

    def put(self, key: Hashable, value: object) -> None:
        self._drop(key)
        size = self.size_of(value)
        if self.max_bytes is not None and size > self.max_bytes:
            return  # one entry larger than the whole budget is not kept at all
        self._items[key] = (value, size)
        self._bytes += size
        while len(self._items) > self.capacity or (self.max_bytes is not None and self._bytes > self.max_bytes):
            self._drop(next(iter(self._items)))

    def _drop(self, key: Hashable) -> None:
        if key in self._items:
            self._bytes -= self._items.pop(key)[1]

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()
        self._bytes = 0


@dataclass(frozen=True)
class HashedImage:
    """An RGB image with its content digest, computed once and used by every cache key."""

    rgb: np.ndarray
    digest: str

    @classmethod
    def of(cls, rgb: np.ndarray) -> HashedImage:
        digest = hashlib.blake2b(memoryview(rgb), digest_size=16)  # load_image gives C-contiguous arrays
        digest.update(str(rgb.shape).encode())
        return cls(rgb, digest.hexdigest())


@dataclass
class EncodedImage:
    """An image's vision features, ready for any prompt. Tensors stay on the model's device."""

    image_size: tuple[int, int]  # (height, width)
    fpn_hidden_states: tuple[torch.Tensor, ...]
    fpn_position_encoding: tuple[torch.Tensor, ...]
    decoder_skips: tuple[torch.Tensor, ...] | None = None  # see speedups.PixelDecoderSkips
    first_self_attention: dict = field(default_factory=dict)  # see speedups.FirstSelfAttentionMemo

    def expanded(self, batch: int):
        """The encoding repeated for `batch` prompts, as views: no copy of the features."""
        from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

        def grow(tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            return tuple(t.expand(batch, *t.shape[1:]) for t in tensors)

        return Sam3VisionEncoderOutput(
            fpn_hidden_states=grow(self.fpn_hidden_states), fpn_position_encoding=grow(self.fpn_position_encoding)
        )


class Segmenter:
    """SAM3 for text and box prompts, with a precision plan and caches. Thread-safe."""

    def __init__(self, loaded: LoadedModel, plan: PrecisionPlan, *, force_precision: bool = False, cache_size: int = 8,
                 image_encoder: OnnxVisionEncoder | None = None, views: int | None = None):
        reuse_freed_memory()
        self.views = first_views(loaded.test_time_views if views is None else views)  # checked before any work
        self.loaded = loaded
        self.model = loaded.model
        self.processor = loaded.processor
        self.device = plan.device
        self.default_plan = plan
        self.force_precision = force_precision
        self.weights_dtype = plan.weights_dtype
        self.counters = {"image_encodings": 0, "text_encodings": 0, "forward_passes": 0, "fp32_fallbacks": 0}
        self._lock = threading.RLock()
        self._images = LruCache(cache_size)
        self._texts = LruCache(512)
        # Raw outputs hold P x Q mask logits (about 66 MB per prompt at full size), so few are kept.
        self._predictions = LruCache(max(1, cache_size // 2), max_bytes=PREDICTION_CACHE_BYTES, size_of=_raw_bytes)
        self._plans: dict[str, PrecisionPlan] = {plan.requested.value: plan}
        self.image_encoder = image_encoder
        if image_encoder is not None:  # its own weights encode images: free torch's before quantizing
            self.model.vision_encoder = _EncodedElsewhere()
        keep_sensitive_modules_fp32(self.model)
        if self.weights_dtype != torch.float32:
            cast_weights(self.model, self.weights_dtype)
        self.quantized = plan.used is Precision.INT8
        if self.quantized:
            quantize_int8(self.model)
        self._pixel_decoder = PixelDecoderSkips.install(self.model)
        self._first_self_attention = FirstSelfAttentionMemo.install(self.model)
        self._mask_head = FoldedMaskHead.install(self.model)
        install_complex_rope()

    @property
    def model_name(self) -> str:
        return self.loaded.name

    @property
    def default_threshold(self) -> float:
        """The score threshold calibrated for this model (0.5 when it ships none)."""
        return self.loaded.score_threshold

    def plan_for(self, precision: str | Precision | None) -> PrecisionPlan:
        """The plan for a per-call precision. Weights stay in the dtype they were loaded in; fp32
        on half weights runs them upcast for the call (see `_weights_for`)."""
        if precision is None:
            return self.default_plan
        key = Precision.parse(precision).value
        if key not in self._plans:
            plan = resolve(key, self.device, force=self.force_precision)
            if (plan.used is Precision.INT8) != self.quantized:
                raise PrecisionError(
                    f"This model was loaded for {self.default_plan.describe()}; int8 and the float modes need different weights, "
                    f"so load it again with --precision {plan.used.value} to run {plan.used.value}."
                )
            if self.weights_dtype != torch.float32 and plan.autocast_dtype not in (self.weights_dtype, None):
                raise PrecisionError(
                    f"This model was loaded with {self.default_plan.describe()} weights, which cannot run {plan.used.value}; "
                    "load it again with --weights-dtype fp32 to switch precision per request."
                )
            self._plans[key] = PrecisionPlan(plan.requested, plan.used, plan.device, self.weights_dtype, plan.reason)
        return self._plans[key]

    # --- the public calls ------------------------------------------------------------------

    def segment(
        self,
        image: ImageInput,
        prompts: PromptsInput | None = None,
        *,
        threshold: float | None = None,
        mask_threshold: float = 0.5,
        refine: int = 0,
        nms_iou: float | None = None,
        snap_edges: bool = True,
        precision: str | Precision | None = None,
        boxes: Sequence[Sequence[float]] | None = None,
        box_labels: Sequence[int] | None = None,
    ) -> Result:
        """Find every object matching each prompt. See `predict` for the inputs and
        `postprocess.select` for threshold (default: the model's own, see `default_threshold`),
        mask_threshold, refine, nms_iou and snap_edges."""
        started = time.perf_counter()
        threshold = self.default_threshold if threshold is None else threshold
        postprocess.check_options(threshold, mask_threshold, refine, nms_iou)
        raw = self.predict(image, prompts, precision=precision, boxes=boxes, box_labels=box_labels)
        result = postprocess.select(
            raw, threshold=threshold, mask_threshold=mask_threshold, refine=refine, nms_iou=nms_iou, snap_edges=snap_edges
        )
        result.timings_ms["total"] = (time.perf_counter() - started) * 1000
        return result

    def predict(
        self,
        image: ImageInput,
        prompts: PromptsInput | None = None,
        *,
        precision: str | Precision | None = None,
        boxes: Sequence[Sequence[float]] | None = None,
        box_labels: Sequence[int] | None = None,
    ) -> RawPrediction:
        """Run the model (or reuse its cached outputs) for an image and its prompts.

        image: path, bytes, PIL image or (H, W, 3) uint8 array. prompts: "red car, dog",
        ["red car", "dog"], {"dog": 0.3} or `Prompt`s. boxes: exemplar boxes xyxy in pixels,
        applied to every text prompt (or alone when no text is given); box_labels: 1 positive,
        0 negative (default all positive).
        """
        started = time.perf_counter()
        picture = HashedImage.of(load_image(image))
        decode_ms = (time.perf_counter() - started) * 1000
        has_boxes = boxes is not None and len(boxes) > 0
        prompt_list = attach_boxes(parse_prompts(prompts, boxes_given=has_boxes), boxes, box_labels)
        prompt_list = fit_boxes_to_image(prompt_list, *picture.rgb.shape[:2])
        plan = self.plan_for(precision)
        if plan.reason:
            warnings.warn(f"{plan.requested.value} -> {plan.used.value}: {plan.reason}.", Sam3Warning, stacklevel=2)
        with self._lock:
            # Per-prompt thresholds do not change what the model computes, so they are not in the key.
            model_inputs = tuple((p.text, p.boxes, p.box_labels) for p in prompt_list)
            key = (picture.digest, model_inputs, plan.used, plan.weights_dtype)
            raw = self._predictions.get(key)
            if raw is not None:  # the model did not run: only decoding took time
                timings = {"decode_image": decode_ms, "total": (time.perf_counter() - started) * 1000}
                return replace(raw, prompts=prompt_list, precision_requested=plan.requested.value, timings_ms=timings)
            raw = self._run(picture, prompt_list, plan)
            for array in (raw.scores, raw.boxes, raw.mask_logits):
                array.flags.writeable = False  # shared by every caller that hits the cache
            raw.timings_ms |= {"decode_image": decode_ms, "total": (time.perf_counter() - started) * 1000}
            self._predictions.put(key, raw)
            return raw

    def clear_caches(self) -> None:
        """Forget every cached image encoding, text embedding and raw output: frees their memory,
        and makes the next call pay for everything, as a benchmark of new inputs needs."""
        with self._lock:
            for cache in (self._images, self._texts, self._predictions):
                cache.clear()

    def encode_image(self, image: ImageInput, precision: str | Precision | None = None) -> EncodedImage:
        """Vision features of an image, computed once per (content, precision, input size)."""
        picture = HashedImage.of(load_image(image))
        with self._lock:
            plan = self.plan_for(precision)
            with self._weights_for(plan):
                return self._encode(picture, plan)

    # --- the model passes ------------------------------------------------------------------

    def _run(self, picture: HashedImage, prompts: list[Prompt], plan: PrecisionPlan) -> RawPrediction:
        timings: dict[str, float] = {}
        with self._weights_for(plan):
            outputs = self._forward_views(picture, prompts, plan, timings)
        fallback = False
        # Only half precision can overflow; int8 layers compute and return fp32.
        if plan.autocast_dtype is not None and not all_finite(*outputs):
            warnings.warn(
                f"{plan.used.value} produced non-finite outputs; running this image again in fp32.", Sam3Warning, stacklevel=3
            )
            fallback = True
            self.counters["fp32_fallbacks"] += 1
            outputs = self._forward_fp32(picture, prompts, plan, timings)
        scores, boxes, masks = outputs
        height, width = picture.rgb.shape[:2]
        boxes = boxes * torch.tensor([width, height, width, height], dtype=boxes.dtype)
        raw = RawPrediction(
            image_size=(height, width),
            prompts=prompts,
            scores=scores.numpy(),
            boxes=boxes.numpy(),
            mask_logits=masks.numpy(),
            model=self.model_name,
            precision_requested=plan.requested.value,
            precision_used=Precision.FP32.value if fallback else plan.used.value,
            fallback_fp32=fallback,
            timings_ms=timings,
            image=_frozen_copy(picture.rgb),
        )
        return postprocess.with_mask_confidence(raw, self.loaded.mask_confidence_power)

    def _forward_fp32(self, picture: HashedImage, prompts, plan: PrecisionPlan, timings) -> tuple[torch.Tensor, ...]:
        fp32 = PrecisionPlan(plan.requested, Precision.FP32, plan.device)
        with self._weights_for(fp32):
            return self._forward_views(picture, prompts, fp32, timings)

    def _forward_views(self, picture: HashedImage, prompts: list[Prompt], plan: PrecisionPlan, timings) -> tuple[torch.Tensor, ...]:
        """`_forward` on each of the model's test-time views, merged in the image's frame (see `views`)."""
        height, width = picture.rgb.shape[:2]
        outputs = []
        for view in self.views:
            if view.is_identity:
                outputs.append(self._forward(picture, prompts, plan, timings))
                continue
            mirrored = [replace(p, boxes=view.boxes(p.boxes, width, height)) for p in prompts]
            scores, boxes, masks = self._forward(HashedImage.of(view.image(picture.rgb)), mirrored, plan, timings)
            outputs.append((scores, *view.back(boxes, masks)))
        return merge_views(outputs)

    @contextlib.contextmanager
    def _weights_for(self, plan: PrecisionPlan) -> Iterator[None]:
        """Half weights run only inside their own autocast: an fp32 pass (asked for per call, or
        the fallback) upcasts them for its duration. bf16/fp16 -> fp32 -> bf16/fp16 is exact, so
        the pass loses nothing and the weights come back unchanged."""
        if self.weights_dtype == torch.float32 or plan.autocast_dtype == self.weights_dtype:
            yield
            return
        try:
            self.model.float()  # inside: an out-of-memory error halfway must still restore every weight
            yield
        finally:
            cast_weights(self.model, self.weights_dtype)

    def _forward(self, picture: HashedImage, prompts, plan: PrecisionPlan, timings) -> tuple[torch.Tensor, ...]:
        """One pass: (scores (P, Q), normalised xyxy boxes (P, Q, 4), mask logits (P, Q, h, w)),
        all float32 on the CPU."""
        start = time.perf_counter()
        encoded = self._encode(picture, plan)
        _add_time(timings, "encode_image", start)

        start = time.perf_counter()
        text_embeds, text_mask = self._encode_texts([p.text or BOX_ONLY_TEXT for p in prompts], plan)
        synchronize(plan.device)
        _add_time(timings, "encode_text", start)

        start = time.perf_counter()
        # A prompt without boxes batched beside prompts with boxes would get an all-padding box
        # input, which changes its answer; so the two kinds run as separate passes.
        kinds = ([i for i, p in enumerate(prompts) if not p.boxes], [i for i, p in enumerate(prompts) if p.boxes])
        size = self._prompts_per_pass(encoded)
        groups = [kind[start : start + size] for kind in kinds for start in range(0, len(kind), size)]
        # Each pass's outputs go straight to their prompts' rows: at full size the mask logits are
        # 66 MB per prompt, and gathering the passes with cat and reorder held them three times.
        outputs: list[torch.Tensor] = []
        for group in groups:
            part = self._detect(encoded, text_embeds[group], text_mask[group], [prompts[i] for i in group], plan)
            if not outputs:
                outputs = [torch.empty((len(prompts), *t.shape[1:]), dtype=torch.float32) for t in part]
            rows = _as_slice(group)
            for whole, piece in zip(outputs, part):
                # Consecutive rows take the pass's output in one copy that also converts it to
                # float32 on the CPU; scattered rows (box prompts among text ones) need it converted first.
                whole[rows] = piece if isinstance(rows, slice) else piece.to(whole.device, whole.dtype)
            del part
        _add_time(timings, "detect", start)
        return tuple(outputs)

    def _prompts_per_pass(self, encoded: EncodedImage) -> int:
        """How many prompts one pass takes: as many as keep the pass's largest activations (the
        pixel decoder's, channels x mask size, several alive at once) within PASS_BUDGET_BYTES.
        At full size that is 2 prompts (85 MB per tensor and prompt); the demo model takes 48.
        Bigger batches gain nothing on a CPU here and cost gigabytes: 10 prompts in one pass
        took 1.8x the peak memory of plain transformers, and longer per prompt."""
        finest = encoded.fpn_hidden_states[0]
        queries = self.model.config.detr_decoder_config.num_queries
        per_prompt = finest[0].numel() * 4 * 6 + queries * finest.shape[-1] * finest.shape[-2] * 4
        return max(1, min(MAX_PROMPTS_PER_PASS, PASS_BUDGET_BYTES // per_prompt))

    def _detect(self, encoded: EncodedImage, text_embeds, text_mask, prompts: list[Prompt], plan: PrecisionPlan):
        """One batched pass of detector and mask decoder for `prompts` against the encoding."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        input_boxes, input_labels = self._box_tensors(prompts, encoded.image_size)
        with (
            torch.inference_mode(),
            plan.autocast(),
            self._pixel_decoder.using(encoded.decoder_skips),
            self._first_self_attention.using(encoded.first_self_attention),
            self._mask_head.using(),
        ):
            out = self.model(
                vision_embeds=encoded.expanded(len(prompts)),
                text_embeds=BaseModelOutputWithPooling(pooler_output=text_embeds),
                attention_mask=text_mask,
                input_boxes=input_boxes,
                input_boxes_labels=input_labels,
            )
        self.counters["forward_passes"] += 1
        scores = out.pred_logits.float().sigmoid() * out.presence_logits.float().sigmoid()
        return scores, out.pred_boxes, out.pred_masks  # on the model's device, in the pass's dtype

    def _encode(self, picture: HashedImage, plan: PrecisionPlan) -> EncodedImage:
        size = self.processor.image_processor.size  # fixed per model today; in the key so it may vary
        key = (picture.digest, plan.used, plan.weights_dtype, size["height"], size["width"])
        encoded = self._images.get(key)
        if encoded is None:
            # Said, not guessed: transformers reads an image 1-4 pixels tall as channels-first.
            pixels = self.processor.image_processor(images=picture.rgb, return_tensors="pt", input_data_format="channels_last")
            pixels = pixels["pixel_values"].to(self.device)
            with torch.inference_mode(), plan.autocast():
                features, positions = self._vision_features(pixels)
                skips = self._pixel_decoder.image_skips(features[:-1])  # the levels Sam3Model passes on
            encoded = EncodedImage(picture.rgb.shape[:2], features, positions, skips)
            synchronize(plan.device)
            self.counters["image_encodings"] += 1
            self._images.put(key, encoded)
        return encoded

    def _vision_features(self, pixels: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """(FPN maps, their position encodings) of the vision encoder, in torch or ONNX Runtime."""
        if self.image_encoder is not None:
            return self.image_encoder(pixels)
        vision = self.model.get_vision_features(pixel_values=pixels)
        return tuple(vision.fpn_hidden_states), tuple(vision.fpn_position_encoding)

    def _encode_texts(self, texts: list[str], plan: PrecisionPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """Text embeddings (P, 32, D) and attention mask (P, 32), from cache where possible."""
        missing = [t for t in dict.fromkeys(texts) if self._texts.get((t, plan.used)) is None]
        if missing:
            tokens = self._tokenize(missing)
            with torch.inference_mode(), plan.autocast():
                embeds = self.model.get_text_features(**tokens).pooler_output
            for i, text in enumerate(missing):
                self._texts.put((text, plan.used), (embeds[i : i + 1], tokens["attention_mask"][i : i + 1]))
            self.counters["text_encodings"] += len(missing)
        pairs = [self._texts.get((t, plan.used)) for t in texts]
        return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        tokenizer = self.processor.tokenizer
        for text in texts:
            count = len(tokenizer(text)["input_ids"])
            if count > MAX_TEXT_TOKENS:
                warnings.warn(
                    f"Prompt {text[:40]!r}... is {count} tokens; SAM3 reads the first {MAX_TEXT_TOKENS}, the rest is cut.",
                    Sam3Warning,
                    stacklevel=5,
                )
        tokens = tokenizer(texts, padding="max_length", max_length=MAX_TEXT_TOKENS, truncation=True, return_tensors="pt")
        return {"input_ids": tokens["input_ids"].to(self.device), "attention_mask": tokens["attention_mask"].to(self.device)}

    def _box_tensors(self, prompts: list[Prompt], image_size: tuple[int, int]):
        """Exemplar boxes as the model takes them: (P, N, 4) normalised cxcywh, labels (P, N)
        with -10 marking padding. None when no prompt has boxes."""
        most = max(len(p.boxes) for p in prompts)
        if most == 0:
            return None, None
        height, width = image_size
        boxes = torch.zeros(len(prompts), most, 4)
        labels = torch.full((len(prompts), most), -10, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            for j, (x0, y0, x1, y1) in enumerate(prompt.boxes):
                boxes[i, j] = torch.tensor([(x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height])
                labels[i, j] = prompt.box_labels[j] if prompt.box_labels else 1
        return boxes.to(self.device), labels.to(self.device)


def _add_time(timings: dict[str, float], stage: str, since: float) -> None:
    """Milliseconds since `since`, added to the stage's total: test-time views run each stage more than once."""
    timings[stage] = timings.get(stage, 0.0) + (time.perf_counter() - since) * 1000


def _raw_bytes(raw: RawPrediction) -> int:
    image = 0 if raw.image is None else raw.image.nbytes
    return raw.scores.nbytes + raw.boxes.nbytes + raw.mask_logits.nbytes + image


def _as_slice(rows: list[int]) -> slice | list[int]:
    """`rows` as a slice when they are consecutive, which indexes without a gather."""
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return rows


def load_segmenter(
    model: str = "demo",
    *,
    precision: str | Precision = "auto",
    device: str = "auto",
    weights_dtype: str | None = None,
    force_precision: bool = False,
    offline: bool | None = None,
    revision: str | None = None,
    token: str | None = None,
    cache_size: int = 8,
    backend: str = "torch",
    views: int | None = None,
) -> Segmenter:
    """Load a SAM3 model (hub id, local folder or "demo") and wrap it in a Segmenter.

    precision: fp32 | fp16 | bf16 | auto, resolved against the device (see `precision.resolve`).
    weights_dtype: None (= auto): bf16/fp16 when `auto` runs that, read straight in that dtype;
    fp32; or bf16/fp16 explicitly, to halve the weights' memory (needs that autocast).
    backend: "torch", or "onnxruntime" to encode images with ONNX Runtime's int8 (int8 only, on
    the CPU; the first use of a checkpoint exports it, see `onnx_vision`).
    views: test-time views, 1, 2 or 4 (see `views`); None: as many as the model's settings ask
    for (the demo model: 4), else 1.
    """
    torch_device = _pick_device(device)
    plan = resolve(precision, torch_device, force=force_precision, weights_dtype=weights_dtype)
    _check_backend(backend, plan)
    # int8 reads bf16 and quantizes layer by layer (see `quantize_int8`): no fp32 copy of the model.
    read_as = torch.bfloat16 if plan.used is Precision.INT8 else plan.weights_dtype
    loaded = load_model(model, device=torch_device, offline=offline, revision=revision, token=token, weights_dtype=read_as)
    image_encoder = None
    if backend == "onnxruntime":
        size = loaded.processor.image_processor.size
        image_encoder = OnnxVisionEncoder.for_checkpoint(loaded.folder, (size["height"], size["width"]))
    return Segmenter(loaded, plan, force_precision=force_precision, cache_size=cache_size, image_encoder=image_encoder, views=views)


def _check_backend(backend: str, plan: PrecisionPlan) -> None:
    if backend not in BACKENDS:
        raise PrecisionError(f"Unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}.")
    if backend == "onnxruntime":
        if plan.used is not Precision.INT8 or plan.device.type != "cpu":
            raise PrecisionError(
                f"The onnxruntime backend runs int8 on the CPU only (its fp32 was no faster than torch's here); "
                f"this load would run {plan.used.value} on {plan.device.type}. Use --precision int8, or the torch backend."
            )
        require_onnx()


class _EncodedElsewhere(torch.nn.Module):
    """Stands in for the vision encoder when ONNX Runtime encodes the images, so that torch's
    copy of its weights (half the model) is not kept for nothing."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("This Segmenter encodes images with ONNX Runtime; the torch vision encoder was freed.")


def _pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise PrecisionError(f"Unknown device {device!r}: use auto, cpu, cuda or cuda:N.") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise PrecisionError(f"Device {device!r} asked for, but this machine has no usable CUDA GPU; use --device cpu.")
    return chosen


def synchronize(device: torch.device) -> None:
    """CUDA runs asynchronously: wait for it so that timings measure the work, not the launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _frozen_copy(array: np.ndarray) -> np.ndarray:
    """A read-only copy: the image a cached prediction keeps to guide its masks must not change
    when the caller edits the array it passed in (load_image returns such arrays as they are)."""
    copy = array.copy()
    copy.flags.writeable = False
    return copy
