"""Model architectures and training recipes the project trains itself, starting with "demo":
a small SAM3-architecture model for colored shapes that ships with the package."""

from __future__ import annotations

import gzip
import os
from dataclasses import asdict, replace
from pathlib import Path

BPE_MERGES = Path(__file__).with_name("clip_bpe_8k.txt.gz")
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
DEMO_IMAGE_SIZE = 336  # the demo architecture's input size; the recipe's last two stages train at 420 (demo_position_resolution_stage)


def clip_tokenizer():
    """CLIP's own BPE tokenizer cut to its 8,000 most frequent merges: ordinary English prompts
    tokenize as CLIP would ("purple" is one token, "triangle" two), with an 8,514-token
    vocabulary instead of 49,408, which keeps a small model's text embedding small."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    with gzip.open(BPE_MERGES, "rt", encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().splitlines()[1:] if line]
    byte_symbols = list(bytes_to_unicode().values())
    tokens = [*byte_symbols, *(s + "</w>" for s in byte_symbols), *("".join(m) for m in merges), *SPECIAL_TOKENS]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges)


def demo_architecture(vocab_size: int, bos: int, eos: int, image_size: int = DEMO_IMAGE_SIZE):
    """The demo model: SAM3's architecture at about 1/150 of its size. 336 px input, 24x24
    patches, 96x96 masks; every width 112."""
    from transformers import Sam3Config

    grid = image_size // 14
    width = 112
    return Sam3Config(
        vision_config={
            "backbone_config": {
                "model_type": "sam3_vit_model",
                "hidden_size": width,
                "intermediate_size": 4 * width,
                "num_hidden_layers": 4,
                "num_attention_heads": 4,
                "image_size": image_size,
                "patch_size": 14,
                "window_size": grid // 3,
                "global_attn_indexes": [1, 3],
                "pretrain_image_size": image_size,
            },
            "fpn_hidden_size": width,
            "backbone_feature_sizes": [[grid * 4, grid * 4], [grid * 2, grid * 2], [grid, grid]],
        },
        text_config={
            "model_type": "clip_text_model",
            "vocab_size": vocab_size,
            "hidden_size": width,
            "intermediate_size": 2 * width,
            "projection_dim": width,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "max_position_embeddings": 32,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "pad_token_id": eos,
        },
        geometry_encoder_config={"hidden_size": width, "num_layers": 1, "num_attention_heads": 4, "intermediate_size": 2 * width, "roi_size": 3},
        detr_encoder_config={"hidden_size": width, "num_layers": 2, "num_attention_heads": 4, "intermediate_size": 2 * width},
        detr_decoder_config={"hidden_size": width, "num_layers": 3, "num_queries": 16, "num_attention_heads": 4, "intermediate_size": 2 * width},
        mask_decoder_config={"hidden_size": width, "num_attention_heads": 4},
    )


def build_demo_model(image_size: int = DEMO_IMAGE_SIZE, seed: int = 0, sincos_positions: bool = False):
    """A fresh (untrained) demo model and its processor; with `sincos_positions`, its ViT
    position embeddings start as `sincos_position_embeddings` instead of transformers' noise."""
    import torch
    from transformers import Sam3ImageProcessor, Sam3Model, Sam3Processor

    grid = image_size // 14
    tokenizer = clip_tokenizer()
    bos, eos = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    config = demo_architecture(len(tokenizer), bos, eos, image_size)
    torch.manual_seed(seed)
    model = Sam3Model(config)
    with torch.no_grad():
        # transformers' std 0.02 makes every prompt's text features nearly the same vector
        # (cosine 0.93-0.99 between "blue star" and "green square" at init); words must differ.
        model.text_encoder.text_model.embeddings.token_embedding.weight.normal_(0.0, 1.0)
        # The prompt reaches the image tokens through the DETR encoder's cross-attention, whose
        # output starts at 2% of the tokens' norm and shrank to 0.6% in training: the model
        # learned to ignore the prompt. Starting it at ~10% keeps the prompt in play.
        for layer in model.detr_encoder.layers:
            layer.cross_attn.o_proj.weight.mul_(5.0)
        if sincos_positions:
            table = model.vision_encoder.backbone.embeddings.position_embeddings
            table.copy_(sincos_position_embeddings(grid, table.shape[-1])[None])
    image_processor = Sam3ImageProcessor(size={"height": image_size, "width": image_size}, mask_size={"height": 4 * grid, "width": 4 * grid})
    return model, Sam3Processor(image_processor=image_processor, tokenizer=tokenizer)


SINCOS_POSITION_NORM = 1.5  # about a fresh patch embedding's norm on the demo's images


def sincos_position_embeddings(grid: int, width: int):
    """(grid * grid, width): sin and cos of each patch's column (first half of the channels) and
    row (second half) at width / 4 frequencies from 1 to 1/10,000 radians a patch, as in MAE,
    scaled to SINCOS_POSITION_NORM per patch.

    Why: transformers starts the table as noise of std 0.02, a seventh of the patch embeddings'
    norm, and the ViT's first layer drowned it. A demo model trained from it had mask features
    that did not say where a pixel is (linear read-out of x and y: R^2 below 0), so no query
    could single out one of two like objects. From these waves, with `criterion.position_loss`,
    the ViT keeps the position and its finest features learn it (see
    `demo_position_encoder_stage`; runs/demo-checkpoint/RESUME.md)."""
    import torch

    quarter = width // 4
    rates = 1.0 / 10_000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij")
    waves = []
    for coordinate in (xs, ys):
        angles = coordinate.reshape(-1, 1) * rates
        waves += [angles.sin(), angles.cos()]
    table = torch.cat(waves, 1)
    return table * (SINCOS_POSITION_NORM / table.norm(dim=1, keepdim=True))


# --- the demo recipe -------------------------------------------------------------------------

DEMO_DATA = {"train": (16000, 101), "val": (200, 202), "test": (300, 303)}  # scenes, seed


_DEMO_COMMON = dict(images_per_step=4, weight_decay=0.05, checkpoint_every=100, log_every=20, precision="auto", seed=0, image_size=DEMO_IMAGE_SIZE)
DEMO_DETECTOR_STEPS = 3000


def demo_training_stages(out: str, data: str, steps: int | None = None) -> list:
    """The one documented recipe that produces the shipped demo model, as resumable runs: the
    encoders alone with the pixel positions kept (`demo_position_encoder_stage`, in
    `out`/encoder-position), a second, lower cycle of them on new batches
    (`demo_position_encoder_polish_stage`, in `out`/encoder-polish), then the whole model from
    them (`demo_position_detector_stage`, in `out`/detector-position), a second, lower cycle of
    it (`demo_position_polish_stage`, in `out`/polish-position), that cycle again at a 420 px
    input (`demo_position_resolution_stage`, in `out`/resolution-position), and a last, lower one
    on new batches (`demo_position_refine_stage`, in `out`/refine-position). `steps` overrides
    the detector run's length.

    Why the encoders first: trained end to end from scratch (test mIoU 0.44), the vision encoder
    learned colors but not shapes: its object pixels got the right shape 35% of the time, 77%
    after an encoder stage. Why the positions: without them every query of a prompt with two or
    three objects drew one mask over all of them (oracle mIoU 0.32-0.48, 0.60-0.69 with them).
    Why the polish: calibrated on the validation split, it gained mIoU 0.679 -> 0.697 and recall
    0.752 -> 0.769 at the same rate of answered absent prompts; the 420 px cycle gained
    0.697 -> 0.734 and 0.769 -> 0.803 more, and the last cycle 0.734 -> 0.750 and 0.803 -> 0.822
    (mostly by calibration choosing a lower threshold). Why 16,000 training scenes (DEMO_DATA)
    and a 6,000-step encoder stage: on 4,000 scenes and 4,000 encoder steps the same five stages
    scored test mIoU 0.7652, recall 0.841, precision 0.823; on these, 0.7807, 0.849, 0.853. Why
    the encoder polish: the vision features named the shape of 0.751 of the objects of 1,000
    new scenes instead of 0.720, and at the end of the chain, on the validation split at the same
    rate of answered absent prompts, mIoU 0.8219 and recall 0.890 against 0.8148 and 0.888 (one
    view), 0.8406 and 0.906 against 0.8285 and 0.894 (four test-time views, `DEMO_VIEWS`).
    runs/demo-checkpoint/RESUME.md has the measurements."""
    return [demo_position_encoder_stage(out, data), demo_position_encoder_polish_stage(out, data),
            demo_position_detector_stage(out, data, steps or DEMO_DETECTOR_STEPS), demo_position_polish_stage(out, data),
            demo_position_resolution_stage(out, data), demo_position_refine_stage(out, data)]


def _end_of(stage) -> str:
    """Where a stage's final checkpoint is, which is where the stage after it starts."""
    from .loop import CHECKPOINT_DIR

    return str(Path(stage.out) / CHECKPOINT_DIR)


# Every stage asks the finest vision features where each pixel is (`criterion.position_loss`).
DEMO_POSITION_WEIGHT = 20.0


def demo_position_encoder_stage(out: str, data: str, steps: int = 6000, lr: float = 3e-3):
    """The vision and text encoders alone (in `out`/encoder-position, from scratch), on the
    per-pixel losses against category and shape names, 8 images a step at a high rate, so that
    the features know shapes before any decoder trains on them (see `Trainer.dense_losses`).
    Background pixels weigh 0.1, or they are most of what is learned.

    The ViT position table starts as `sincos_position_embeddings` and the position loss is on:
    after 4,000 steps a linear read-out of x and y from the finest features had R^2 0.88 / 0.75
    (~0 without them), and the categories were learned as well (per-pixel category loss 0.384,
    against 0.371). 6,000 steps on 16,000 scenes name the shape of 0.720 of the objects of 1,000
    unseen scenes, against 0.687 after 4,000 on 4,000 (`probes.pixel_name_accuracy`)."""
    from .criterion import LossWeights
    from .loop import TrainConfig

    weights = LossWeights(category=1.0, supercategory=1.0, category_background=0.1, position=DEMO_POSITION_WEIGHT)
    common = _DEMO_COMMON | dict(images_per_step=8, checkpoint_every=250, log_every=50)  # steps are 4x cheaper: save and log less often
    return TrainConfig(out=str(Path(out) / "encoder-position"), data=data, steps=steps, dense_only=True, lr=lr, warmup_steps=100,
                       weights=weights, sincos_positions=True, **common)


def demo_position_encoder_polish_stage(out: str, data: str, steps: int = 3000):
    """The encoders alone once more (in `out`/encoder-polish), from `demo_position_encoder_stage`'s
    end, on the same losses at a tenth of its rate (lr 3e-4, 50 warmup steps) and on new batches
    (seed 3). Not in the recipe yet: an experiment for the detector to start from.

    Why: the whole-model stages barely teach the vision features shapes (objects' shape read
    from them 0.720 after the encoder stage, 0.731 after all five), and the scores that confuse
    shapes hold the demo model's figures; each earlier gain in that read-out came back about
    twice as large in validation mIoU at the detector stage (RESUME.md)."""
    encoder = demo_position_encoder_stage(out, data)
    return replace(encoder, out=str(Path(out) / "encoder-polish"), model=_end_of(encoder), steps=steps, lr=3e-4, warmup_steps=50,
                   seed=3, sincos_positions=False)


def demo_position_detector_stage(out: str, data: str, steps: int = DEMO_DETECTOR_STEPS):
    """The whole model (in `out`/detector-position), from `demo_position_encoder_stage`'s
    encoders, with the category and position losses kept on. Two choices against the failures
    of end-to-end training: scores are trained toward each query's mask IoU (`set_criterion`'s
    quality_targets), since with plain targets every query scored ~0.2, matched or not; and one
    of each image's 3 absent prompts is a shape missing from it, since absent shape-only prompts
    were rarely drawn and nearly all of them found something. The mask focal loss weighs 20, as
    in MaskFormer (at 5 it was under 1% of the total).

    By step 503 of 3,000 each of a prompt's two or three objects had a mask of its own
    (validation oracle mIoU 0.60-0.69, against 0.32-0.48 without the positions)."""
    from .criterion import LossWeights
    from .loop import TrainConfig

    weights = LossWeights(category=2.0, supercategory=2.0, category_background=0.1, presence=3.0, mask_focal=20.0, position=DEMO_POSITION_WEIGHT)
    return TrainConfig(out=str(Path(out) / "detector-position"), model=_end_of(demo_position_encoder_polish_stage(out, data)), steps=steps,
                       negatives_per_image=3, coarse_negatives=1, quality_targets=True, lr=3e-4, warmup_steps=100, weights=weights,
                       **_DEMO_COMMON, data=data)


def demo_position_polish_stage(out: str, data: str, steps: int = 1000):
    """The whole model again (in `out`/polish-position), from `demo_position_detector_stage`'s
    end, with the same losses and a second, lower cosine cycle (lr 1e-4). In the recipe before
    this one the detector stage was still improving when its schedule ran out (validation oracle
    mIoU 0.705 -> 0.725 over its second half), and the same polish gained test mIoU 0.5436 ->
    0.5537."""
    detector = demo_position_detector_stage(out, data)
    return replace(detector, out=str(Path(out) / "polish-position"), model=_end_of(detector), steps=steps, lr=1e-4, warmup_steps=50)


def demo_position_resolution_stage(out: str, data: str, steps: int = 800, image_size: int = 420):
    """The whole model once more (in `out`/resolution-position), from `demo_position_polish_stage`'s
    end, at a 420 px input (30x30 patches, 120x120 masks) instead of 336, the polish stage's
    losses and rate otherwise. Small objects were the weakest (oracle mIoU 0.54 below a tenth of
    the image side, 0.86 at a fifth to three tenths in the recipe before this one), and they span
    one or two 14-pixel patches at 336 px; 504 px gained less than 420 and steps 3x slower.

    The ViT position table is stretched to the larger grid (`resolution.with_input_size`), which
    keeps a sin/cos table's waves at the same places in the image, and the position loss's
    targets are in image coordinates, so neither needs relearning."""
    polish = demo_position_polish_stage(out, data)
    return replace(polish, out=str(Path(out) / "resolution-position"), model=_end_of(polish), steps=steps, image_size=image_size)


def demo_position_refine_stage(out: str, data: str, steps: int = 600):
    """A last, lower cycle at 420 px (in `out`/refine-position), from
    `demo_position_resolution_stage`'s end: lr 5e-5, and batches drawn with seed 1. A batch
    depends on (seed, step) alone, so every stage with seed 0 has replayed the first batches
    the detector stage saw; a new seed shows the model new pairings of scenes and flips."""
    resolution = demo_position_resolution_stage(out, data)
    return replace(resolution, out=str(Path(out) / "refine-position"), model=_end_of(resolution), steps=steps, lr=5e-5, seed=1)


def prepare_demo_data(root: str | Path) -> dict[str, Path]:
    """Render the demo's train / val / test shapes datasets under `root`, unless already there."""
    from .shapes import write_dataset

    folders = {}
    for split, (count, seed) in DEMO_DATA.items():
        folder = Path(root) / split
        if not (folder / "annotations.json").is_file():
            write_dataset(folder, count, seed)
        folders[split] = folder
    return folders


# Test-time views the demo model runs (see `views`): four cost four passes, and on the validation
# split gained 0.02-0.03 mIoU over one at the same share of absent prompts answered.
DEMO_VIEWS = 4


def export_demo_model(checkpoint: str | Path, splits: dict[str, Path], destination: str | Path, *, notes: dict) -> list[dict]:
    """Install a trained checkpoint's model files in `destination` with its test-time views, its
    score threshold and mask-confidence power calibrated on the validation split (fp32) with those
    views, its scores on the test split in fp32 and bf16 (eval.json), and a model card. Returns the
    test reports."""
    import json
    import shutil

    from ..evaluate import answers, calibrate_scoring, collect, score_answers
    from ..loading import SETTINGS_FILE
    from ..segmenter import load_segmenter
    from .data import CocoSegmentationData
    from .loop import TRAINER_FILES

    seg = load_segmenter(str(checkpoint), precision="fp32", device="cpu", force_precision=True, views=DEMO_VIEWS)
    cases, _ = collect(seg, CocoSegmentationData(splits["val"]), precision="fp32")
    power, threshold = calibrate_scoring(cases)
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    for path in Path(checkpoint).iterdir():
        if path.suffix in (".json", ".safetensors", ".txt") and path.name not in TRAINER_FILES:
            shutil.copy2(path, destination / path.name)
    settings = {"score_threshold": threshold, "mask_confidence_power": power, "test_time_views": DEMO_VIEWS}
    (destination / SETTINGS_FILE).write_text(json.dumps(settings, indent=1))
    installed = load_segmenter(str(destination), precision="fp32", device="cpu", force_precision=True)  # scored as users load it
    test = CocoSegmentationData(splits["test"])
    reports, kinds = [], []
    for mode in ("fp32", "bf16"):  # bf16 as asked, even where this CPU would run fp32 for speed
        cases, seconds = collect(installed, test, precision=mode)
        measured = answers(cases)
        report = score_answers(measured, threshold, label=mode)
        report.seconds = seconds
        reports.append(report.as_dict())
        if mode == "fp32":
            kinds = _by_prompt_kind(measured, threshold)
    (destination / "eval.json").write_text(json.dumps(reports, indent=1))
    (destination / "README.md").write_text(_model_card(seg.model.config, threshold, power, notes, reports + kinds), encoding="utf-8")
    return reports


# Prompt kinds of the shapes data: "blue star" (one color, one shape) and "star" (any color).
PROMPT_KINDS = {"fp32, color + shape prompts": lambda name: " " in name, "fp32, shape-only prompts": lambda name: " " not in name}


def _by_prompt_kind(measured: list[dict], threshold: float) -> list[dict]:
    """The test scores of each kind of prompt on its own: a model can know colors before shapes."""
    from ..evaluate import score_answers

    return [score_answers(answers_of_kind(measured, keep), threshold, label=label).as_dict() for label, keep in PROMPT_KINDS.items()]


def answers_of_kind(measured: list[dict], keep) -> list[dict]:
    """`evaluate.answers` of each case with only the prompts (present and absent) whose names
    `keep` accepts: the answers are measured once, whichever kinds are scored."""
    return [{name: answer for name, answer in case.items() if keep(name)} for case in measured]


def _model_card(config, threshold: float, power: float, notes: dict, reports: list[dict]) -> str:
    from ..evaluate import MAX_NEGATIVE_FP_RATE, MIN_PRECISION

    test_count, test_seed = DEMO_DATA["test"]
    size = config.vision_config.backbone_config.image_size
    masks = config.vision_config.backbone_feature_sizes[0][0]
    lines = [
        "# sam3studio demo model",
        "",
        "A small model with SAM3's architecture (transformers `Sam3Model`, width 112, 4.4 M parameters,",
        f"{size} px input, {masks}x{masks} masks) trained from scratch by `sam3studio train --preset demo` on",
        "synthetic scenes of colored shapes (`sam3studio.train.shapes`). It finds red, orange, yellow,",
        "green, blue and purple circles, squares, triangles and stars: prompts such as \"blue star\".",
        "Shape-only prompts (\"star\") are weaker than those naming the color too (see the test table).",
        "It knows nothing else.",
        "",
        f"Every image is run in {DEMO_VIEWS} test-time views (as it is, mirrored left-right, upside down and half "
        "turned; `sam3studio.views`) and their answers averaged; `views=1` runs it once, four times faster and less sure.",
        f"Its {masks}x{masks} masks are upsampled to the image along the image's edges (`sam3studio.edges`, a colour "
        "guided filter); `snap_edges=False` upsamples them bilinearly, as transformers does.",
        "",
        f"Default score threshold: {threshold}, on scores times the mask's confidence to the power {power} "
        "(`postprocess.with_mask_confidence`). Both calibrated on the validation split, fp32, with those views: the "
        f"lowest threshold at which at most {MAX_NEGATIVE_FP_RATE:.0%} of absent prompts return anything and at least "
        f"{MIN_PRECISION:.0%} of the answers are right (IoU 0.5), which finds the most within those limits.",
        "",
        f"## Test split ({test_count} scenes, seed {test_seed}, never seen in training), at that threshold",
        "",
        "| precision | mIoU | precision@0.5 | recall@0.5 | FP rate, absent prompts | duplicates | instances |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['precision']} | {r['miou']:.4f} | {r['precision_at_50']:.3f} | {r['recall_at_50']:.3f} | "
        f"{r['negative_fp_rate']:.3f} | {r['duplicates']} | {r['instances']} |"
        for r in reports
    ]
    lines += ["", "## Training", ""]
    lines += [f"- {key}: {value}" for key, value in notes.items()]
    return "\n".join(lines) + "\n"


def _stage_summary(number: int, config) -> str:
    start = "from scratch" if number == 1 else "from the previous stage's weights"
    if config.sincos_positions:
        start += " (ViT position table starting as sin/cos waves)"
    if config.dense_only:
        what = f"{config.images_per_step} images, vision and text encoders only, on the per-pixel category losses"
    else:
        coarse = f" ({config.coarse_negatives} an absent shape)" if config.coarse_negatives else ""
        scores = ", scores trained toward mask IoU" if config.quality_targets else ""
        what = f"{config.images_per_step} images with {config.negatives_per_image} absent prompts each{coarse}{scores}"
    return (f"stage {number}, {start}: {config.steps} steps of {what} at {config.image_size or DEMO_IMAGE_SIZE} px, AdamW lr {config.lr} ({config.warmup_steps} warmup steps, cosine), "
            f"seed {config.seed}, loss weights {asdict(config.weights)}")


def training_notes(trainers: list) -> dict:
    """What the model card says about a finished recipe (one trainer per stage): recipe, data,
    machine and time. The time is summed from each run's log, so runs resumed across sessions
    count every part."""
    seconds, recipes, machines = 0.0, [], {}
    for number, trainer in enumerate(trainers, start=1):
        config, history = trainer.config, trainer.history
        steps_before = [0] + [h["step"] for h in history[:-1]]
        for entry, before in zip(history, steps_before):
            steps = entry["step"] - before
            seconds += entry["seconds"] * steps
            counted = machines.setdefault(entry.get("machine", "not recorded"), [0, 0.0])
            counted[0] += steps
            counted[1] += entry["seconds"] * steps
        recipes.append(_stage_summary(number, config))
    last = trainers[-1]
    count, seed = DEMO_DATA["train"]
    steps = sum(t.step for t in trainers)
    return {
        "command": "sam3studio train --preset demo (each stage's seed below)",
        "data": f"{count} training scenes (seed {seed}); prompts: each category and shape present, plus absent ones "
                "(half of them sharing a word with a present name)",
        "loss": "DETR set loss with per-layer auxiliary losses, presence and dense-head losses, and a per-pixel "
                "category loss on the vision features",
        "recipe": "; ".join(recipes),
        "precision": f"{last.config.precision}, resolved on each machine: "
        + "; ".join(
            f"{name}: {steps} steps, {time / 60:.0f} min ({time / max(1, steps):.2f} s per step)" for name, (steps, time) in machines.items()
        ) + f"; {os.cpu_count()} cores",
        "training time": f"{seconds / 60:.0f} min for {steps} steps ({seconds / max(1, steps):.2f} s per step)",
        "final losses": ", ".join(f"{k} {v:.3f}" for k, v in last.history[-1]["losses"].items()) if last.history else "none",
    }
