"""Find SAM3 weights (hub id, local folder, offline cache, or the shipped demo model) and load
them safely: safetensors only, every weight accounted for, errors that say what to do.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .views import VIEW_COUNTS

DEMO_MODEL_NAME = "demo"
DEMO_MODEL_DIR = Path(__file__).parent / "models" / "demo"
# What a SAM3 snapshot needs; never *.bin or *.pt, which would be unpickled.
SNAPSHOT_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.md"]
SETTINGS_FILE = "sam3studio.json"  # settings a model ships with, e.g. its calibrated score threshold
DEFAULT_SCORE_THRESHOLD = 0.5
MAX_MASK_CONFIDENCE_POWER = 16.0  # beyond it the confidence alone decides the score
_TRUE = ("1", "true", "yes", "on")


class ModelLoadError(RuntimeError):
    """The model could not be found or loaded; the message says what to do about it."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    processor: object  # transformers.Sam3Processor
    name: str  # what the user asked for: hub id, folder or "demo"
    folder: Path  # where the files were read from
    revision: str | None  # hub commit hash, when loaded from the hub cache
    score_threshold: float = DEFAULT_SCORE_THRESHOLD  # the model's own default, from SETTINGS_FILE
    mask_confidence_power: float = 0.0  # from SETTINGS_FILE; see postprocess.with_mask_confidence
    test_time_views: int = 1  # from SETTINGS_FILE; see views


def offline_requested(offline: bool | None = None) -> bool:
    """Offline if asked explicitly, or through HF_HUB_OFFLINE / SAM3_OFFLINE."""
    if offline is not None:
        return offline
    return any(os.environ.get(var, "").lower() in _TRUE for var in ("HF_HUB_OFFLINE", "SAM3_OFFLINE"))


def resolve_model_folder(
    name: str | os.PathLike,
    *,
    offline: bool | None = None,
    revision: str | None = None,
    token: str | None = None,
) -> tuple[Path, str | None]:
    """Return (local folder holding config + safetensors, hub revision or None).

    A hub id is fetched into the Hugging Face cache once (`sam3studio download`); afterwards it
    loads with no network at all when offline.
    """
    name = str(name)
    if name == DEMO_MODEL_NAME:
        return _demo_folder()
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{path} is a file; --model takes a folder holding config.json and model.safetensors, or a hub id.")
        return path, None
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelLoadError(f"{name}: no such folder, and not a hub id of the form owner/name (e.g. facebook/sam3).")
    return _hub_snapshot(name, offline=offline_requested(offline), revision=revision, token=token)


def _demo_folder() -> Path:
    if not (DEMO_MODEL_DIR / "config.json").is_file():
        raise ModelLoadError(
            "The demo model is not in this install yet (it is trained by `sam3studio train --preset demo`). "
            "Use --model with a SAM3 hub id (facebook/sam3) or a local folder meanwhile."
        )
    return DEMO_MODEL_DIR, None


def _hub_snapshot(repo_id: str, *, offline: bool, revision: str | None, token: str | None) -> tuple[Path, str | None]:
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hub_errors

    try:
        folder = Path(
            snapshot_download(
                repo_id, revision=revision, token=token, local_files_only=offline, allow_patterns=SNAPSHOT_PATTERNS
            )
        )
    except hub_errors.HFValidationError:  # e.g. a mistyped folder "my models/sam3", or "owner/name@main"
        raise ModelLoadError(f"{repo_id}: no such folder, and not a valid hub id of the form owner/name (e.g. facebook/sam3).") from None
    except hub_errors.GatedRepoError:
        raise ModelLoadError(
            f"{repo_id} is gated. Request access at https://huggingface.co/{repo_id}, then set HF_TOKEN "
            "(or run `hf auth login`) and run `sam3studio download` once; later runs work offline."
        ) from None
    except hub_errors.RepositoryNotFoundError:
        raise ModelLoadError(
            f"{repo_id} was not found on the Hugging Face hub. Check the id, or set HF_TOKEN if it is private."
        ) from None
    except hub_errors.RevisionNotFoundError:
        raise ModelLoadError(f"{repo_id} has no revision {revision!r}.") from None
    except (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled):
        how = "offline mode is on (HF_HUB_OFFLINE/SAM3_OFFLINE/--offline)" if offline else "the hub could not be reached"
        raise ModelLoadError(
            f"{repo_id} is not in the local cache and {how}. Run `sam3studio download {repo_id}` on a machine "
            "with internet access (same HF_HOME), or pass --model a local folder."
        ) from None
    except hub_errors.HfHubHTTPError as exc:
        raise ModelLoadError(f"Downloading {repo_id} failed: {exc}") from None
    return folder, folder.name


def load_model(
    name: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    offline: bool | None = None,
    revision: str | None = None,
    token: str | None = None,
    weights_dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    """Load `Sam3Model` and `Sam3Processor` from a hub id, a local folder or "demo".

    weights_dtype bf16/fp16 reads the weights straight into that dtype, so that an fp32 copy of a
    3.4 GB model never exists, except the numerically sensitive modules (`precision.FP32_MODULE_NAMES`),
    which are read in fp32."""
    from safetensors import SafetensorError
    from transformers import Sam3Processor

    folder, hub_revision = resolve_model_folder(name, offline=offline, revision=revision, token=token)
    _require_safetensors(folder)
    try:
        model, info = _from_pretrained(folder, weights_dtype)
        processor = Sam3Processor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:  # RuntimeError: shape mismatch
        raise ModelLoadError(f"{folder} does not hold a loadable SAM3 model: {exc}") from None
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise ModelLoadError(
            f"{folder}: {len(missing)} weights are missing from the checkpoint (e.g. {missing[:3]}); "
            "it is not a complete SAM3 model."
        )
    return LoadedModel(model.to(device).eval(), processor, str(name), folder, hub_revision, *_model_settings(folder))


def _from_pretrained(folder: Path, weights_dtype: torch.dtype):
    """`from_pretrained`, and for half weights from the checkpoint read with pread, one tensor at
    a time. transformers memory-maps it otherwise, and every page it reads to convert stays
    resident until the map closes: the fp32 file (3.4 GB at full size) plus the bf16 copy made
    a peak of 5.7 GB where 2.6 GB suffice (full size, measured)."""
    from safetensors import safe_open
    from transformers import Sam3Config

    cls = _model_class(weights_dtype)
    files = _weight_files(folder)
    if weights_dtype == torch.float32 or not files:
        return cls.from_pretrained(folder, use_safetensors=True, local_files_only=True, output_loading_info=True, dtype=weights_dtype)
    with contextlib.ExitStack() as stack:
        state_dict = {}
        for path in files:
            reader = stack.enter_context(safe_open(str(path), framework="pt", backend="pread"))
            state_dict.update({key: reader.get_slice(key) for key in reader.keys()})  # read when converted
        config = Sam3Config.from_pretrained(folder, local_files_only=True)
        return cls.from_pretrained(None, config=config, state_dict=state_dict, output_loading_info=True, dtype=weights_dtype)


def _weight_files(folder: Path) -> list[Path]:
    """The model's weight files: model.safetensors, or the shards its index lists ([] if neither)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted({folder / name for name in json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()})
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


@functools.cache
def _model_class(weights_dtype: torch.dtype) -> type:
    """`Sam3Model`, or for half weights a subclass that tells transformers which modules to
    read in fp32 (its `_keep_in_fp32_modules_strict`); the weights and config are unchanged."""
    from transformers import Sam3Model

    from .precision import FP32_MODULE_NAMES

    if weights_dtype == torch.float32:
        return Sam3Model
    return type("Sam3ModelHalfWeights", (Sam3Model,), {"_keep_in_fp32_modules_strict": list(FP32_MODULE_NAMES)})


def _model_settings(folder: Path) -> tuple[float, float, int]:
    """The score threshold, mask-confidence power and test-time views calibrated for this model,
    if it ships them; 0.5, 0 and 1 (scores as the model gives them) otherwise."""
    path = folder / SETTINGS_FILE
    if not path.is_file():
        return DEFAULT_SCORE_THRESHOLD, 0.0, 1
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
        threshold = float(settings["score_threshold"])
        power = float(settings.get("mask_confidence_power", 0.0))
        views = settings.get("test_time_views", 1)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelLoadError(f"{path} is not valid: {exc}") from None
    if type(views) is not int or views not in VIEW_COUNTS:  # not True, not 4.0: JSON has both
        raise ModelLoadError(f"{path}: test_time_views {views!r} is not one of {', '.join(map(str, VIEW_COUNTS))}.")
    if not 0.0 <= threshold <= 1.0:
        raise ModelLoadError(f"{path}: score_threshold {threshold} is not between 0 and 1.")
    if not 0.0 <= power <= MAX_MASK_CONFIDENCE_POWER:
        raise ModelLoadError(f"{path}: mask_confidence_power {power} is not between 0 and {MAX_MASK_CONFIDENCE_POWER}.")
    return threshold, power, views


def _require_safetensors(folder: Path) -> None:
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} has no config.json: not a transformers model folder.")
    if not any(folder.glob("*.safetensors")):
        pickles = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        hint = f" It has {', '.join(pickles)}, which would be unpickled; convert it to safetensors first." if pickles else ""
        raise ModelLoadError(f"{folder} has no .safetensors weights.{hint}")


def download_model(name: str, *, revision: str | None = None, token: str | None = None) -> Path:
    """Fill the local cache with `name` so that later loads work offline."""
    folder, _ = resolve_model_folder(name, offline=False, revision=revision, token=token)
    return folder


def cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached_models() -> list[str]:
    """Hub ids of the SAM3-looking models in the local cache (for `sam3studio info`)."""
    root = cache_dir()
    if not root.is_dir():
        return []
    names = [p.name.removeprefix("models--").replace("--", "/") for p in root.glob("models--*")]
    return sorted(n for n in names if "sam" in n.lower())
