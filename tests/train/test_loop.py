import json
import os
import signal

import numpy as np
import pytest
import torch

from sam3studio.train.data import CocoSegmentationData, DataError
from sam3studio.train.loop import CHECKPOINT_DIR, TrainConfig, Trainer, load_for_training, train
from sam3studio.train.shapes import SceneConfig, write_dataset


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("shapes"), 8, seed=11, config=SceneConfig(min_side=64, max_side=112, max_objects=3))


def _config(shapes, tiny_checkpoint, out, **overrides) -> TrainConfig:
    options = dict(data=str(shapes), out=str(out), model=str(tiny_checkpoint), steps=6, images_per_step=2, lr=1e-3,
                   warmup_steps=2, checkpoint_every=100, log_every=1, precision="fp32", seed=3)
    return TrainConfig(**(options | overrides))


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_loss_goes_down(tiny_checkpoint, tmp_path, precision):
    two_scenes = write_dataset(tmp_path / "two", 2, seed=4, config=SceneConfig(min_side=64, max_side=96, max_objects=2))
    config = _config(two_scenes, tiny_checkpoint, tmp_path / precision, steps=60, negatives_per_image=1, precision=precision, force_precision=True)
    trainer = train(config)
    assert trainer.plan.used.value == precision
    totals = [entry["losses"]["total"] for entry in trainer.history]
    assert np.mean(totals[-5:]) < 0.7 * np.mean(totals[:5]), totals
    metrics = json.loads((tmp_path / precision / "metrics.json").read_text())
    assert len(metrics["log"]) == 60 and (tmp_path / precision / "loss_curve.png").stat().st_size > 1000


def _stop_after(step: int):
    def on_log(log):
        if log.step == step:
            os.kill(os.getpid(), signal.SIGTERM)

    return on_log


def test_resume_gives_the_same_state(shapes, tiny_checkpoint, tmp_path):
    straight = train(_config(shapes, tiny_checkpoint, tmp_path / "straight"))
    half = train(_config(shapes, tiny_checkpoint, tmp_path / "halves"), on_log=_stop_after(3))
    assert half.step == 3
    resumed = train(_config(shapes, tiny_checkpoint, tmp_path / "halves"))
    assert resumed.step == 6
    a, b = _weights(straight.model), _weights(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run matches an uninterrupted one"
    assert [e["step"] for e in resumed.history] == list(range(1, 7))
    with pytest.raises(ValueError, match="other settings .lr."):
        train(_config(shapes, tiny_checkpoint, tmp_path / "halves", lr=5e-4))


def test_sigterm_saves_a_checkpoint_and_stops(shapes, tiny_checkpoint, tmp_path):
    config = _config(shapes, tiny_checkpoint, tmp_path / "run")
    model, processor = load_for_training(config)
    trainer = Trainer(config, model, processor)
    assert trainer.run(_stop_after(2)) is False
    state = json.loads((tmp_path / "run" / CHECKPOINT_DIR / "trainer_state.json").read_text())
    assert state["step"] == 2
    assert train(config).step == 6


def test_freeze_keeps_encoders_fixed(shapes, tiny_checkpoint, tmp_path):
    config = _config(shapes, tiny_checkpoint, tmp_path / "frozen", steps=3, freeze=("vision", "text"))
    model, processor = load_for_training(config)
    before = _weights(model)
    trainer = Trainer(config, model, processor)
    trainer.run()
    after = _weights(trainer.model)
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("vision_encoder", "text_encoder")))
    assert not all(torch.equal(before[k], after[k]) for k in before if k.startswith("detr_decoder"))


def _break(shapes, tmp_path, change) -> str:
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(shapes, folder)
    document = json.loads((folder / "annotations.json").read_text())
    change(document, folder)
    (folder / "annotations.json").write_text(json.dumps(document))
    return str(folder)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda d, f: (f / "images" / d["images"][0]["file_name"]).unlink(), "missing"),
        (lambda d, f: d.update(annotations=[]), "no annotations"),
        (lambda d, f: d["annotations"][0].update(category_id=999), "unknown category_id 999"),
        (lambda d, f: d["annotations"][0]["segmentation"].update(size=[5, 5]), "mask size"),
        (lambda d, f: d["annotations"][0].update(segmentation=[[0, 0, 5000, 0, 5000, 10]]), "outside"),
        (lambda d, f: d["annotations"][0].update(segmentation=[[0, 0, 5, 0, 5]]), "even number"),
    ],
)
def test_bad_datasets_fail_clearly(shapes, tmp_path, change, message):
    with pytest.raises(DataError, match=message):
        CocoSegmentationData(_break(shapes, tmp_path, change))


def test_image_size_must_match_its_annotations(shapes, tmp_path):
    def swap(document, folder):
        info = next(i for i in document["images"] if i["width"] != i["height"])
        info["width"], info["height"] = info["height"], info["width"]  # as if EXIF-rotated
        for ann in document["annotations"]:
            if ann["image_id"] == info["id"]:
                ann["segmentation"]["size"] = [info["height"], info["width"]]
                ann["bbox"] = [0, 0, 1, 1]

    data = CocoSegmentationData(_break(shapes, tmp_path, swap))
    index = next(i for i, image_id in enumerate(data.image_ids) if data.images[image_id]["width"] != data.images[image_id]["height"])
    with pytest.raises(DataError, match="would not line up"):
        data.sample(index, np.random.default_rng(0), input_size=56, mask_size=16, mean=[0.5] * 3, std=[0.5] * 3)
