import json

import pytest
import torch

from sam3studio.checkpoints import build_random_checkpoint, checkpoint_spec


def test_full_size_is_the_real_sam3_architecture():
    from transformers import Sam3Model

    config, processor = checkpoint_spec("full")
    with torch.device("meta"):  # shapes only: no 3.4 GB of memory
        model = Sam3Model(config)
    params = sum(p.numel() for p in model.parameters())
    assert 835e6 < params < 845e6, params
    assert processor.image_processor.size == {"height": 1008, "width": 1008}
    assert config.text_config.eos_token_id < len(processor.tokenizer)


def test_tiny_checkpoint_is_small_and_in_safetensors(tiny_checkpoint):
    files = {p.name: p.stat().st_size for p in tiny_checkpoint.iterdir()}
    assert "model.safetensors" in files and not any(n.endswith(".bin") for n in files)
    assert files["model.safetensors"] < 5_000_000
    assert json.loads((tiny_checkpoint / "config.json").read_text())["model_type"] == "sam3"


def test_same_seed_same_weights(tmp_path):
    from safetensors.torch import load_file

    a = load_file(build_random_checkpoint(tmp_path / "a", seed=3) / "model.safetensors")
    b = load_file(build_random_checkpoint(tmp_path / "b", seed=3) / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_size():
    with pytest.raises(ValueError, match="tiny, full"):
        checkpoint_spec("huge")
