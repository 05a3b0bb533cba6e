"""The mixed-precision training loop: AdamW, warmup + cosine schedule, gradient clipping,
checkpoints (safetensors) that resume exactly, and a clean stop on Ctrl-C or SIGTERM.

The forward pass runs under the core's precision plan (bf16 autocast on a CPU where bf16 is
fast, fp16 + GradScaler or bf16 on CUDA); the loss is always computed in fp32.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..precision import Precision, PrecisionPlan, keep_sensitive_modules_fp32, resolve
from ..segmenter import MAX_TEXT_TOKENS
from ..speedups import PixelDecoderSkips
from .criterion import LossWeights, Predictions, category_loss, every_name_loss, position_loss, set_criterion
from .data import CocoSegmentationData, TrainingSample
from .denoising import DenoisingOutput, denoising_losses, denoising_pass, weighted_total

CHECKPOINT_DIR = "checkpoint"
CATEGORY_HEAD_FILE = "category_head.safetensors"
# Files of a checkpoint that belong to the trainer, not to the model it trains.
TRAINER_FILES = ("optimizer.safetensors", CATEGORY_HEAD_FILE, "trainer_state.json")
# Settings a resumed run must share with the one it continues, or its batches and schedule change.
RESUME_MUST_MATCH = ("data", "model", "steps", "images_per_step", "negatives_per_image", "coarse_negatives", "quality_targets", "dense_only", "lr", "weight_decay",
                     "warmup_steps", "min_lr_ratio", "seed", "freeze", "image_size", "denoising_groups", "box_noise", "weights")
MAX_NONFINITE_STEPS = 5  # skipped steps in a row before a run is judged diverged
FREEZABLE = {"vision": ("vision_encoder",), "text": ("text_encoder", "text_projection")}


class TrainingDiverged(RuntimeError):
    """Training keeps producing gradients that are not finite; the message says what to change."""


@dataclass
class TrainConfig:
    data: str  # COCO dataset folder (annotations.json + images/)
    out: str  # run folder: checkpoint/, metrics.json, loss_curve.png
    model: str | None = None  # hub id or folder to fine-tune; None trains a fresh "demo" architecture
    steps: int = 2000
    images_per_step: int = 4
    negatives_per_image: int = 2
    coarse_negatives: int = 0  # of those, how many are absent supercategory names (see data.sample)
    quality_targets: bool = False  # scores learn each query's IoU, not the Hungarian match (see set_criterion)
    dense_only: bool = False  # train the encoders on the per-pixel category losses alone (see Trainer.dense_losses)
    denoising_groups: int = 0  # noised copies of each target box run as extra decoder queries (see train.denoising); 0: off
    box_noise: float = 0.4  # how far those copies are moved and resized, as a fraction of the box's size
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    precision: str = "auto"
    force_precision: bool = False  # run bf16/fp16 even on a CPU where they are slow
    seed: int = 0
    freeze: tuple[str, ...] = ()
    checkpoint_every: int = 100
    log_every: int = 10
    device: str = "cpu"
    image_size: int | None = None  # input size; None: the model's own (DEMO_IMAGE_SIZE for a fresh demo architecture)
    sincos_positions: bool = False  # a fresh demo architecture's ViT position table starts as sin/cos waves (see presets)
    weights: LossWeights = field(default_factory=LossWeights)


@dataclass
class StepLog:
    step: int
    losses: dict[str, float]
    lr: float
    seconds: float


class LayerCapture:
    """Collect what `Sam3Model.forward` computes for every decoder layer but returns only for
    the last one: scores, reference boxes and box offsets, presence logits; and, for the
    denoising queries and the position loss, the decoder's inputs and the mask features."""

    def __init__(self, model: torch.nn.Module):
        self.decoder_inputs: dict = {}
        self._handles = [
            model.detr_decoder.register_forward_pre_hook(self._on_decoder_inputs, with_kwargs=True),
            model.detr_decoder.register_forward_hook(self._on_decoder),
            model.dot_product_scoring.register_forward_hook(self._on_scores),
            model.detr_decoder.box_head.register_forward_hook(self._on_box_head),
            model.mask_decoder.instance_projection.register_forward_hook(self._on_mask_features),
        ]

    def _on_decoder_inputs(self, module, args, kwargs) -> None:
        self.decoder_inputs = dict(kwargs)

    def _on_decoder(self, module, args, output) -> None:
        self.decoder = output

    def _on_mask_features(self, module, args, output) -> None:
        self.mask_features = output

    def _on_scores(self, module, args, output) -> None:
        self.scores = output

    def _on_box_head(self, module, args, output) -> None:
        if output.dim() == 4:  # the all-layers call in Sam3Model.forward, not the per-layer refinement
            self.offsets = output

    def predictions(self, output) -> Predictions:
        from transformers.models.sam3.modeling_sam3 import box_cxcywh_to_xyxy, inverse_sigmoid

        boxes = box_cxcywh_to_xyxy((inverse_sigmoid(self.decoder.reference_boxes) + self.offsets).sigmoid())
        return Predictions(self.scores.squeeze(-1), boxes, self.decoder.presence_logits, output.pred_masks, output.semantic_seg,
                           mask_features=self.mask_features, query_states=self.decoder.intermediate_hidden_states)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


class CategoryHead(torch.nn.Module):
    """Scores every pixel's vision feature against the text embedding of every category name
    (and a learned background), CLIP-style: cosine similarity times a learned temperature.

    Why through the text encoder: trained from scratch, SAM3's text features collapse to nearly
    one vector for every prompt (cosine 0.99 between "blue star" and "blue circle" after 300
    steps), and nothing that depends on the prompt can be learned from them. Aligning them with
    the pixels of their category gives each name its own direction from the first steps."""

    def __init__(self, vision_width: int, text_width: int):
        super().__init__()
        self.pixels = torch.nn.Conv2d(vision_width, text_width, 1)
        self.background = torch.nn.Parameter(torch.randn(text_width) * 0.02)
        self.log_temperature = torch.nn.Parameter(torch.tensor(math.log(10.0)))

    def forward(self, features: torch.Tensor, names: torch.Tensor) -> torch.Tensor:
        """features (B, C, M, M), names (K, D) -> logits (B, K + 1, M, M); class 0 is background."""
        pixels = torch.nn.functional.normalize(self.pixels(features), dim=1)
        classes = torch.nn.functional.normalize(torch.cat([self.background[None], names]), dim=-1)
        return self.log_temperature.exp() * torch.einsum("bchw,kc->bkhw", pixels, classes)


def tokenize(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    """Texts as SAM3's text encoder reads them: padded and cut to its MAX_TEXT_TOKENS positions."""
    return tokenizer(texts, padding="max_length", max_length=MAX_TEXT_TOKENS, truncation=True, return_tensors="pt")


def forward_batch(model, tokenizer, samples: list[TrainingSample], plan: PrecisionPlan, *, denoising_groups: int = 0,
                  box_noise: float = 0.4) -> tuple[Predictions, list, DenoisingOutput | None]:
    """Encode each image once, then run every prompt of every image in one batched pass; with
    `denoising_groups`, also the denoising queries of those prompts' objects."""
    from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

    device = plan.device
    pixels = torch.from_numpy(np.stack([s.pixels for s in samples])).to(device)
    rows = [(i, p) for i, s in enumerate(samples) for p in s.prompts]
    image_index = torch.tensor([i for i, _ in rows], device=device)
    tokens = tokenize(tokenizer, [p.text for _, p in rows])
    capture = LayerCapture(model)
    decoder = PixelDecoderSkips.install(model)
    targets = [p for _, p in rows]
    denoised = None
    try:
        with plan.autocast():
            vision = model.get_vision_features(pixel_values=pixels)
            per_row = Sam3VisionEncoderOutput(
                fpn_hidden_states=tuple(t[image_index] for t in vision.fpn_hidden_states),
                fpn_position_encoding=tuple(t[image_index] for t in vision.fpn_position_encoding),
            )
            # The pixel decoder's image-only work once per image, not once per prompt row.
            skips = decoder.training_skips(vision.fpn_hidden_states[:-1], image_index)
            with decoder.using(skips):
                output = model(vision_embeds=per_row, input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device))
            if denoising_groups:
                denoised = denoising_pass(model, capture.decoder_inputs, capture.mask_features, targets, denoising_groups, box_noise)
        predictions = capture.predictions(output)
        predictions.pixel_features = vision.fpn_hidden_states[0]
        return predictions, targets, denoised
    finally:
        capture.close()


def scale_mask_logits_at_init(model, processor, target_std: float = 2.0) -> float:
    """transformers' init leaves mask logits near 1e-3 (a product of two small projections),
    which gives the mask losses almost no gradient; scale the mask embedder's output layer so
    the first masks have logits of a useful size. Returns the factor applied."""
    rng = np.random.default_rng(0)
    size = processor.image_processor.size["height"]
    pixels = torch.from_numpy(rng.normal(size=(1, 3, size, size)).astype(np.float32))
    tokens = tokenize(processor.tokenizer, ["a thing"])
    with torch.no_grad():
        std = model(pixel_values=pixels, **tokens).pred_masks.std().item()
        factor = target_std / max(std, 1e-8)
        layer = model.mask_decoder.mask_embedder.layers[-1]
        layer.weight.mul_(factor)
        if layer.bias is not None:
            layer.bias.mul_(factor)
    return factor


def _schedule(config: TrainConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _param_groups(model, weight_decay: float) -> list[dict]:
    """No weight decay for biases, norms and embedding tables; decay for every weight matrix."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or id(param) in tables else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _freeze(model, parts: tuple[str, ...]) -> None:
    for part in parts:
        if part not in FREEZABLE:
            raise ValueError(f"--freeze takes {', '.join(FREEZABLE)}; got {part!r}.")
        for prefix in FREEZABLE[part]:
            for param in getattr(model, prefix).parameters():
                param.requires_grad_(False)


class Trainer:
    """Owns the model, optimizer, schedule and data of one run folder."""

    def __init__(self, config: TrainConfig, model, processor):
        self.config = config
        self.out = Path(config.out)
        self.model, self.processor = model.to(config.device), processor
        self.plan = resolve(config.precision, config.device, force=config.force_precision)
        keep_sensitive_modules_fp32(self.model)
        _freeze(self.model, config.freeze)
        self.data = CocoSegmentationData(config.data)
        self.category_head = self._category_head()
        if config.dense_only and self.category_head is None:
            raise ValueError("dense_only trains on the category losses alone: give `category` or `supercategory` a weight above 0.")
        self.trained = torch.nn.ModuleList([self.model, self.category_head] if self.category_head else [self.model])
        self.optimizer = torch.optim.AdamW(_param_groups(self.trained, config.weight_decay), lr=config.lr, betas=(0.9, 0.999))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(config))
        cuda_fp16 = self.plan.device.type == "cuda" and self.plan.used is Precision.FP16
        self.scaler = torch.amp.GradScaler("cuda") if cuda_fp16 else None
        self.step = 0
        self.nonfinite_steps_in_a_row = 0
        self.lr = config.lr
        self.history: list[dict] = []

    def _category_head(self) -> CategoryHead | None:
        """The head of the dense category losses (None when they are off). It is saved with
        the trainer's checkpoint, not with the model, and a run that starts from such a
        checkpoint starts from its head too."""
        weights = self.config.weights
        if weights.category <= 0 and weights.supercategory <= 0:
            return None
        self.category_levels = self._category_levels()
        torch.manual_seed(self.config.seed)
        vision_width = self.model.config.vision_config.fpn_hidden_size
        text_width = self.model.config.detr_encoder_config.hidden_size
        head = CategoryHead(vision_width, text_width)
        trained_with = Path(self.config.model or "") / CATEGORY_HEAD_FILE
        if self.config.model and trained_with.is_file():  # fine-tuning one of our checkpoints: its head goes on
            from safetensors.torch import load_file

            head.load_state_dict(load_file(trained_with))
        return head.to(self.config.device)

    def _category_levels(self) -> dict[str, tuple[dict, np.ndarray]]:
        """{loss name: (tokens of its class names, table from category number to class number)}.
        "category" scores every pixel against the category names ("blue star"), "supercategory"
        against the supercategory names ("star": any color), where pixels of a category without
        one are ignored (-100)."""
        numbers = self.data.category_number  # category id -> number, 1-based; 0 is background
        levels: dict[str, tuple[list[str], np.ndarray]] = {}
        if self.config.weights.category > 0:
            names = [self.data.categories[cid]["name"] for cid in sorted(numbers)]  # number order
            levels["category"] = (names, np.arange(len(numbers) + 1))
        if self.config.weights.supercategory > 0:
            names = self.data.coarse_names
            table = np.full(len(numbers) + 1, -100)
            table[0] = 0
            for cid, number in numbers.items():
                parent = self.data.categories[cid].get("supercategory")
                if parent in names:
                    table[number] = names.index(parent) + 1
            levels["supercategory"] = (names, table)
        return {k: (tokenize(self.processor.tokenizer, n), t) for k, (n, t) in levels.items()}

    def _category_losses(self, pixel_features: torch.Tensor, samples: list[TrainingSample]) -> dict[str, torch.Tensor]:
        categories = np.stack([s.categories for s in samples])
        return {level: category_loss(self.category_logits(pixel_features, level), torch.from_numpy(table[categories]), self.config.weights.category_background)
                for level, (_, table) in self.category_levels.items()}

    def category_logits(self, pixel_features: torch.Tensor, level: str) -> torch.Tensor:
        """(B, K + 1, M, M): the category head's score of each pixel of the vision features
        (B, C, M, M) against the K class names of `level` ("category" or "supercategory"); class
        0 is background."""
        tokens = {k: v.to(self.plan.device) for k, v in self.category_levels[level][0].items()}
        with self.plan.autocast():
            text = self.model.get_text_features(**tokens).pooler_output
        valid = tokens["attention_mask"][..., None].float()
        names = (text.float() * valid).sum(1) / valid.sum(1)  # mean over real tokens, as the scoring head pools
        return self.category_head(pixel_features.float(), names)

    # --- one step ----------------------------------------------------------------------------

    def batch(self, step: int) -> list[TrainingSample]:
        """The batch of `step` depends on (seed, step) alone, so a resumed run sees the same data."""
        rng = np.random.default_rng([self.config.seed, step])
        processor = self.processor.image_processor
        grid = processor.mask_size["height"]
        indices = rng.choice(len(self.data), size=self.config.images_per_step, replace=len(self.data) < self.config.images_per_step)
        return [
            self.data.sample(int(i), rng, input_size=processor.size["height"], mask_size=grid, mean=processor.image_mean, std=processor.image_std, negatives=self.config.negatives_per_image, coarse_negatives=self.config.coarse_negatives)
            for i in indices
        ]

    def train_step(self) -> dict[str, float]:
        torch.manual_seed(self.config.seed * 1_000_003 + self.step)  # dropout, reproducible on resume
        self.model.train()
        samples = self.batch(self.step)
        losses = self.dense_losses(samples) if self.config.dense_only else self.set_losses(samples)
        self.optimizer.zero_grad(set_to_none=True)
        self.lr = self.scheduler.get_last_lr()[0]  # the rate this step uses, for the log
        if self.scaler is not None:
            self.scaler.scale(losses["total"]).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            losses["total"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trained.parameters(), self.config.grad_clip)
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            stepped = self.scaler.get_scale() >= scale  # a lowered scale means the step was skipped
        else:
            stepped = self._step_if_finite(grad_norm)
        if stepped:
            self.scheduler.step()
        self.step += 1
        return {k: float(v.detach()) for k, v in losses.items()}

    def _step_if_finite(self, grad_norm: torch.Tensor) -> bool:
        """Without a GradScaler nothing else stops a NaN or infinite gradient, and one AdamW step
        on it makes every weight NaN, which the next checkpoint would then keep. So such a step
        is skipped, and a run whose steps keep failing stops with the weights still sound."""
        if torch.isfinite(grad_norm):
            self.optimizer.step()
            self.nonfinite_steps_in_a_row = 0
            return True
        self.nonfinite_steps_in_a_row += 1
        warnings.warn(f"Step {self.step + 1}: the gradients are not finite; the step is skipped.", RuntimeWarning, stacklevel=2)
        if self.nonfinite_steps_in_a_row >= MAX_NONFINITE_STEPS:
            raise TrainingDiverged(
                f"{MAX_NONFINITE_STEPS} steps in a row up to step {self.step + 1} had gradients that are not finite; "
                "the weights are those before them. Try a lower --lr, or --precision fp32."
            )
        return False

    def set_losses(self, samples: list[TrainingSample]) -> dict[str, torch.Tensor]:
        """The full model's losses: the DETR set criterion on every prompt row, plus the
        position, denoising and per-pixel category losses of those that are on."""
        config = self.config
        predictions, targets, denoised = forward_batch(self.model, self.processor.tokenizer, samples, self.plan,
                                                       denoising_groups=config.denoising_groups, box_noise=config.box_noise)
        losses = set_criterion(predictions, targets, config.weights, quality_targets=config.quality_targets)
        if config.weights.position:
            losses["position"] = position_loss(predictions.mask_features)
            losses["total"] = losses["total"] + config.weights.position * losses["position"]
        if denoised is not None:
            extra = denoising_losses(denoised, config.weights)
            losses["total"] = losses["total"] + weighted_total(extra, config.weights)
            losses |= extra
        if config.weights.every_name:
            losses["every_name"] = self._every_name_loss(predictions, samples)
            losses["total"] = losses["total"] + config.weights.every_name * losses["every_name"]
        if self.category_head is not None:
            for level, loss in self._category_losses(predictions.pixel_features, samples).items():
                losses[level] = loss
                losses["total"] = losses["total"] + getattr(self.config.weights, level) * loss
        return losses

    def _every_name_loss(self, predictions: Predictions, samples: list[TrainingSample]) -> torch.Tensor:
        """`criterion.every_name_loss` on `every_name_logits`."""
        present = [{p.text: p for p in sample.prompts if len(p.boxes)} for sample in samples for _ in sample.prompts]  # row order of forward_batch
        logits = self.every_name_logits(predictions.query_states)
        return every_name_loss(logits, predictions.boxes, predictions.masks, present, self.data.vocabulary, self.config.weights.aux)

    def every_name_logits(self, query_states: torch.Tensor) -> torch.Tensor:
        """(L, K, R, Q): the model's own score head applied to the query states (L, R, Q, D) of
        every row with each of the K names of the data's vocabulary in place of the row's prompt."""
        names = self.data.vocabulary
        tokens = {k: v.to(self.plan.device) for k, v in tokenize(self.processor.tokenizer, names).items()}
        layers, rows, queries, width = query_states.shape
        with self.plan.autocast():
            text = self.model.get_text_features(**tokens).pooler_output
            # (L, 1, R*Q, D) against K names broadcasts to (L, K, R*Q, 1)
            logits = self.model.dot_product_scoring(query_states.reshape(layers, 1, rows * queries, width), text, tokens["attention_mask"].bool())
        return logits.reshape(layers, len(names), rows, queries)

    def dense_losses(self, samples: list[TrainingSample]) -> dict[str, torch.Tensor]:
        """The per-pixel category losses alone, from the vision encoder's finest features: no
        prompt rows, no decoder. Why a stage of its own: the encoder learns shapes slowly and
        only at a high rate (4,000 steps at lr 3e-3 put the right shape on 77% of object pixels,
        where the full recipe at 3e-4 reached 35%), and an image costs about a seventh of what
        it costs in a full step (Zen 4, bf16: 1.2 s for 8 images against ~4 s for 4), so a first
        stage can afford those steps before the decoder starts."""
        pixels = torch.from_numpy(np.stack([s.pixels for s in samples])).to(self.plan.device)
        with self.plan.autocast():
            features = self.model.get_vision_features(pixel_values=pixels).fpn_hidden_states[0]
        losses = self._category_losses(features, samples)
        if self.config.weights.position:
            losses["position"] = position_loss(features)  # no mask features without a decoder: the finest vision features
        losses["total"] = sum(getattr(self.config.weights, level) * loss for level, loss in losses.items())
        return losses

    # --- the run -----------------------------------------------------------------------------

    @property
    def machine(self) -> str:
        """What the steps ran on, for the log: runs resumed across sessions change machines."""
        if self.plan.device.type == "cuda":
            device = torch.cuda.get_device_name(self.plan.device)
        else:
            from ..precision import cpu_info

            device = cpu_info().model
        return f"{device}, {self.plan.used.value}"

    def run(self, on_log: Callable[[StepLog], None] | None = None) -> bool:
        """Train to `config.steps`, checkpointing as configured. Returns False when stopped early
        by a signal (after saving a checkpoint), True when finished."""
        window: list[dict[str, float]] = []
        started = time.perf_counter()
        with _stop_requests() as stop, _deterministic():
            while self.step < self.config.steps:
                window.append(self.train_step())
                if self.step % self.config.log_every == 0 or self.step == self.config.steps:
                    log = StepLog(self.step, _mean(window), self.lr, (time.perf_counter() - started) / len(window))
                    self.history.append(asdict(log) | {"machine": self.machine})
                    window, started = [], time.perf_counter()
                    if on_log:
                        on_log(log)
                if self.step % self.config.checkpoint_every == 0 or self.step == self.config.steps or stop.is_set():
                    self.save()
                if stop.is_set():
                    return False
        return True

    # --- checkpoints -------------------------------------------------------------------------

    def save(self) -> Path:
        """Write the checkpoint to a fresh folder, then swap it in: a crash never leaves half of one."""
        from safetensors.torch import save_file

        final = self.out / CHECKPOINT_DIR
        partial = self.out / (CHECKPOINT_DIR + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        self.model.save_pretrained(partial, safe_serialization=True)
        self.processor.save_pretrained(partial)
        tensors, meta = _optimizer_tensors(self.optimizer.state_dict())
        save_file(tensors, partial / "optimizer.safetensors")
        if self.category_head is not None:
            save_file({k: v.contiguous() for k, v in self.category_head.state_dict().items()}, partial / CATEGORY_HEAD_FILE)
        state = {
            "step": self.step,
            "optimizer": meta,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "config": asdict(self.config),
        }
        (partial / "trainer_state.json").write_text(json.dumps(state, indent=1))
        previous = self.out / (CHECKPOINT_DIR + ".previous")
        shutil.rmtree(previous, ignore_errors=True)
        if final.exists():
            final.rename(previous)  # until the new one is in place, the old one stays whole
        partial.rename(final)
        shutil.rmtree(previous, ignore_errors=True)
        (self.out / "metrics.json").write_text(json.dumps({"config": asdict(self.config), "log": self.history}, indent=1))
        plot_losses(self.history, self.out / "loss_curve.png")
        return final

    def resume(self) -> bool:
        """Load optimizer, schedule and step from the run folder's checkpoint, if there is one.
        The model weights are loaded by whoever built the model (see `train`)."""
        from safetensors.torch import load_file

        folder = self.out / CHECKPOINT_DIR
        if not (folder / "trainer_state.json").is_file():
            return False
        state = json.loads((folder / "trainer_state.json").read_text())
        current = json.loads(json.dumps(asdict(self.config)))  # the form it was saved in (tuples as lists)
        changed = {k for k in RESUME_MUST_MATCH if _with_defaults(state["config"]).get(k) != current.get(k)}
        if changed:
            raise ValueError(
                f"{folder} was trained with other settings ({', '.join(sorted(changed))}); resuming would not retrace that run. "
                "Use the same settings, or a new --out folder."
            )
        if self.category_head is not None:
            self.category_head.load_state_dict(load_file(folder / CATEGORY_HEAD_FILE))
        self.optimizer.load_state_dict(_optimizer_state(load_file(folder / "optimizer.safetensors"), state["optimizer"]))
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        metrics = self.out / "metrics.json"
        if metrics.is_file():
            self.history = [entry for entry in json.loads(metrics.read_text())["log"] if entry["step"] <= self.step]
        return True


def _with_defaults(saved: dict) -> dict:
    """A saved config with the settings added since it was saved at their defaults, which
    reproduce what the run did before they existed (a new loss weighted 0, say)."""
    from dataclasses import MISSING, fields

    defaults = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
    merged = {**json.loads(json.dumps(defaults)), **saved}
    merged["weights"] = {**asdict(LossWeights()), **saved.get("weights", {})}
    return merged


def _mean(window: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([w[k] for w in window])) for k in window[0]}


def _optimizer_tensors(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into safetensors-storable tensors and JSON metadata."""
    tensors = {}
    for index, param_state in state["state"].items():
        for key, value in param_state.items():
            tensors[f"{index}.{key}"] = value.detach().contiguous() if torch.is_tensor(value) else torch.tensor(value)
    return tensors, {"param_groups": state["param_groups"]}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


@contextlib.contextmanager
def _stop_requests() -> Iterator[threading.Event]:
    """Turn Ctrl-C and SIGTERM into a request to stop after the current step (main thread only)."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda *_: stop.set())
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    """Deterministic kernels while training, so that a resumed run retraces an uninterrupted
    one exactly (CPU backward passes otherwise differ in the last bits from run to run)."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def plot_losses(history: list[dict], path: Path) -> None:
    """The loss curve as a PNG: total and each component, log scale."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    figure, axis = plt.subplots(figsize=(8, 4.5), dpi=100)
    for name in history[0]["losses"]:
        axis.plot(steps, [h["losses"][name] for h in history], label=name, linewidth=2.2 if name == "total" else 1.0)
    axis.set_yscale("log")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.legend(fontsize=7, ncol=2)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def load_for_training(config: TrainConfig):
    """(model, processor): the run's own checkpoint when resuming, else the model to fine-tune,
    else a fresh demo architecture with its mask logits scaled to a useful size."""
    from transformers import Sam3Model, Sam3Processor

    from ..loading import load_model
    from .presets import DEMO_IMAGE_SIZE, build_demo_model
    from .resolution import with_input_size

    checkpoint = Path(config.out) / CHECKPOINT_DIR
    if (checkpoint / "trainer_state.json").is_file():
        model = Sam3Model.from_pretrained(checkpoint, use_safetensors=True, local_files_only=True)
        return model, Sam3Processor.from_pretrained(checkpoint, local_files_only=True)
    if config.model:
        loaded = load_model(config.model, device="cpu")
        if config.image_size is None:
            return loaded.model, loaded.processor
        return with_input_size(loaded.model, loaded.processor, config.image_size)
    model, processor = build_demo_model(config.image_size or DEMO_IMAGE_SIZE, seed=config.seed, sincos_positions=config.sincos_positions)
    scale_mask_logits_at_init(model, processor)
    return model, processor


def train(config: TrainConfig, on_log: Callable[[StepLog], None] | None = None) -> Trainer:
    """Train (or resume) the run in `config.out`; returns the trainer, whose step tells how far it got."""
    Path(config.out).mkdir(parents=True, exist_ok=True)
    model, processor = load_for_training(config)
    trainer = Trainer(config, model, processor)
    trainer.resume()
    trainer.run(on_log)
    return trainer
