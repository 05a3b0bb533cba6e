import shutil

import numpy as np
import pytest
import torch

from sam3studio import ModelLoadError, load_segmenter
from sam3studio.loading import load_model, resolve_model_folder


def _put_in_hub_cache(checkpoint, hf_home, repo_id: str, revision: str = "0123456789abcdef0123456789abcdef01234567"):
    """Lay a checkpoint out the way huggingface_hub caches a download."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(checkpoint, repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return revision


def test_local_folder_loads_through_the_real_path(tiny_checkpoint):
    loaded = load_model(str(tiny_checkpoint))
    assert type(loaded.model).__name__ == "Sam3Model" and not loaded.model.training
    assert loaded.folder == tiny_checkpoint and loaded.revision is None


def test_hub_id_loads_offline_from_the_cache(tiny_checkpoint, tmp_path, monkeypatch, scene):
    import huggingface_hub.constants as hub_constants

    revision = _put_in_hub_cache(tiny_checkpoint, tmp_path, "sam3studio-test/tiny")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, found_revision = resolve_model_folder("sam3studio-test/tiny")
    assert found_revision == revision and (folder / "model.safetensors").is_file()
    seg = load_segmenter("sam3studio-test/tiny", precision="fp32", offline=True)
    assert seg.segment(scene, "red square", threshold=0.0).model == "sam3studio-test/tiny"


def test_uncached_hub_id_offline_says_how_to_fix_it(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelLoadError, match="not in the local cache.*sam3studio download facebook/sam3"):
        load_model("facebook/sam3", offline=True)


def test_demo_without_a_shipped_model_fails_clearly(monkeypatch, tmp_path):
    import sam3studio.loading as loading

    monkeypatch.setattr(loading, "DEMO_MODEL_DIR", tmp_path / "no-demo")
    with pytest.raises(ModelLoadError, match="demo model is not in this install"):
        load_model("demo")


def test_pickled_weights_are_refused(tiny_checkpoint, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_checkpoint, folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelLoadError, match="no .safetensors.*pytorch_model.bin.*unpickled"):
        load_model(str(folder))


@pytest.mark.parametrize("weights_dtype", [torch.float32, torch.bfloat16])  # bf16 reads the file another way
def test_incomplete_or_corrupt_checkpoint_is_refused(tiny_checkpoint, tmp_path, weights_dtype):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "partial"
    shutil.copytree(tiny_checkpoint, folder)
    weights = load_file(folder / "model.safetensors")
    dropped = next(k for k in weights if "box_head" in k)
    del weights[dropped]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="missing"):
        load_model(str(folder), weights_dtype=weights_dtype)
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:5000])
    with pytest.raises(ModelLoadError, match="does not hold a loadable SAM3 model"):
        load_model(str(folder), weights_dtype=weights_dtype)


@pytest.mark.parametrize("name,message", [("./nowhere", "no such folder"), ("not a repo id", "no such folder"), ("a/b/c", "owner/name"),
                                          ("my models/sam3", "not a valid hub id"), ("facebook/sam3@main", "not a valid hub id")])
def test_bad_model_names(name, message):
    with pytest.raises(ModelLoadError, match=message):
        load_model(name)


def test_file_instead_of_folder(tiny_checkpoint):
    with pytest.raises(ModelLoadError, match="is a file"):
        load_model(str(tiny_checkpoint / "config.json"))


def test_model_runs_on_the_requested_device(tiny_checkpoint):
    loaded = load_model(str(tiny_checkpoint), device="cpu")
    assert next(loaded.model.parameters()).device == torch.device("cpu")


def test_demo_name_loads_the_shipped_folder(monkeypatch, tiny_checkpoint):
    import sam3studio.loading as loading

    monkeypatch.setattr(loading, "DEMO_MODEL_DIR", tiny_checkpoint)
    loaded = load_model("demo")
    assert loaded.name == "demo" and loaded.folder == tiny_checkpoint


def test_truncated_or_mismatched_weights_are_load_errors(tiny_checkpoint, tmp_path):
    import json

    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_checkpoint, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    mismatched = tmp_path / "mismatched"
    shutil.copytree(tiny_checkpoint, mismatched)
    config = json.loads((mismatched / "config.json").read_text())
    config["detr_decoder_config"]["num_queries"] = 5
    (mismatched / "config.json").write_text(json.dumps(config))
    for folder in (truncated, mismatched):
        with pytest.raises(ModelLoadError, match="does not hold a loadable SAM3 model"):
            load_model(str(folder))


def test_a_model_can_ship_its_own_score_threshold(tiny_checkpoint, tmp_path, scene):
    import json

    folder = tmp_path / "calibrated"
    shutil.copytree(tiny_checkpoint, folder)
    (folder / "sam3studio.json").write_text(json.dumps({"score_threshold": 0.0}))
    seg = load_segmenter(str(folder), precision="fp32")
    assert seg.default_threshold == 0.0
    assert seg.segment(scene, "red square").instances, "threshold 0 keeps every non-empty mask"
    assert load_segmenter(str(tiny_checkpoint), precision="fp32").default_threshold == 0.5
    (folder / "sam3studio.json").write_text(json.dumps({"score_threshold": 7}))
    with pytest.raises(ModelLoadError, match="not between 0 and 1"):
        load_model(str(folder))


def test_a_model_can_ship_a_mask_confidence_power(tiny_checkpoint, tmp_path, scene):
    import json

    from sam3studio.postprocess import mask_confidence

    folder = tmp_path / "rescored"
    shutil.copytree(tiny_checkpoint, folder)
    (folder / "sam3studio.json").write_text(json.dumps({"score_threshold": 0.3, "mask_confidence_power": 2}))
    plain = load_segmenter(str(tiny_checkpoint), precision="fp32").predict(scene, "red square, blue circle")
    rescored = load_segmenter(str(folder), precision="fp32").predict(scene, "red square, blue circle")
    assert np.allclose(rescored.scores, plain.scores * mask_confidence(plain.mask_logits) ** 2, atol=1e-6)
    assert not np.allclose(rescored.scores, plain.scores), "the tiny model's masks are not all sure"
    for bad in (-1, 17, "high"):
        (folder / "sam3studio.json").write_text(json.dumps({"score_threshold": 0.3, "mask_confidence_power": bad}))
        with pytest.raises(ModelLoadError, match="mask_confidence_power|not valid"):
            load_model(str(folder))
