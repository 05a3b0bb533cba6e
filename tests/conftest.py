"""Fixtures: a tiny SAM3 checkpoint with random weights, built once per test session and
loaded through the same `load_segmenter` path as a downloaded model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sam3studio import load_segmenter
from sam3studio.checkpoints import build_random_checkpoint
from sam3studio.onnx_vision import CACHE_ENV


@pytest.fixture(scope="session", autouse=True)
def onnx_cache(tmp_path_factory) -> Path:
    """Exported ONNX graphs go to a test folder, not the user's cache (bench workers inherit it)."""
    folder = tmp_path_factory.mktemp("onnx-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(folder))
        yield folder


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return build_random_checkpoint(tmp_path_factory.mktemp("tiny-sam3"), "tiny", seed=0)


@pytest.fixture(scope="session")
def segmenter(tiny_checkpoint):
    return load_segmenter(str(tiny_checkpoint), precision="fp32", device="cpu")


@pytest.fixture
def fresh_segmenter(tiny_checkpoint):
    """A segmenter with empty caches and counters, for tests that count model calls."""
    return load_segmenter(str(tiny_checkpoint), precision="fp32", device="cpu")


@pytest.fixture(scope="session")
def scene() -> np.ndarray:
    """A small non-square image with a few shapes, so that features vary across the image."""
    rng = np.random.default_rng(7)
    image = np.full((90, 130, 3), 40, dtype=np.uint8)
    image[10:50, 15:60] = (220, 30, 30)
    image[40:80, 70:120] = (30, 60, 220)
    image += rng.integers(0, 20, image.shape, dtype=np.uint8)
    return image
