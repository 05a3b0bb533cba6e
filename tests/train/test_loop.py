import json
import os
import signal

import numpy as np
import pytest
import torch

from sam3studio.train.data import CocoSegmentationData, DataError
from sam3studio.train.loop import CHECKPOINT_DIR, TrainConfig, Trainer, TrainingDiverged, load_for_training, train
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


def _poisoned(trainer: Trainer, steps: set[int]) -> None:
    """Make the loss of the given steps (0-based) NaN, as a half-precision overflow would."""
    honest = trainer.set_losses

    def set_losses(samples):
        losses = honest(samples)
        if trainer.step in steps:
            losses["total"] = losses["total"] * float("nan")
        return losses

    trainer.set_losses = set_losses


def test_a_step_with_nan_gradients_is_skipped_and_the_weights_stay_finite(shapes, tiny_checkpoint, tmp_path):
    config = _config(shapes, tiny_checkpoint, tmp_path / "nan", steps=4)
    model, processor = load_for_training(config)
    trainer = Trainer(config, model, processor)
    _poisoned(trainer, {1})
    with pytest.warns(RuntimeWarning, match="Step 2: the gradients are not finite"):
        assert trainer.run() is True
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values())
    assert trainer.scheduler.last_epoch == 3, "the skipped step does not advance the schedule"


def test_a_run_whose_gradients_stay_nan_stops_with_sound_weights(shapes, tiny_checkpoint, tmp_path):
    config = _config(shapes, tiny_checkpoint, tmp_path / "diverged", steps=12)
    model, processor = load_for_training(config)
    trainer = Trainer(config, model, processor)
    _poisoned(trainer, set(range(2, 12)))
    with pytest.warns(RuntimeWarning), pytest.raises(TrainingDiverged, match="5 steps in a row up to step 7"):
        trainer.run()
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values())


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
        (lambda d, f: d["annotations"][0]["segmentation"].update(counts="0P2"), "do not cover"),  # runs of an 8x8 mask
        (lambda d, f: d["annotations"][0]["segmentation"].update(counts=[10, 10**9]), "do not cover"),
        (lambda d, f: d["annotations"][0]["segmentation"].pop("counts"), "do not cover"),
        (lambda d, f: d["images"].append(d["images"][0] | {"file_name": d["images"][1]["file_name"]}), "image id .* given twice"),
        (lambda d, f: d["categories"].append(d["categories"][0] | {"name": "other"}), "category id .* given twice"),
        (lambda d, f: d["images"][0].pop("height"), "needs id .integer., file_name .text., width .integer., height"),
        (lambda d, f: d["categories"][0].update(name=""), "needs id .integer., name .text."),
        (lambda d, f: d["annotations"][0].update(category_id=None), "needs integer image_id and category_id"),
        (lambda d, f: d["categories"].append(d["categories"][0] | {"id": 99, "name": d["categories"][0]["name"].title()}), "differ only in case"),
        (lambda d, f: d["categories"][0].update(name="x" * 501), "is 501 characters long; names are the prompts"),
        (lambda d, f: d["categories"][0].update(supercategory=" \t"), "is blank"),
    ],
)
def test_bad_datasets_fail_clearly(shapes, tmp_path, change, message):
    with pytest.raises(DataError, match=message):
        CocoSegmentationData(_break(shapes, tmp_path, change))


def test_a_coco_file_that_is_not_an_object_fails_clearly(tmp_path):
    (tmp_path / "annotations.json").write_text("[]")
    with pytest.raises(DataError, match="JSON object"):
        CocoSegmentationData(tmp_path)


def test_numbers_written_as_strings_or_floats_are_read(shapes, tmp_path):
    def loosen(document, folder):
        document["images"][0].update(id=str(document["images"][0]["id"]), width=float(document["images"][0]["width"]))
        document["annotations"][0].update(image_id=f"{document['annotations'][0]['image_id']}.0")

    data = CocoSegmentationData(_break(shapes, tmp_path, loosen))
    assert all(isinstance(info["width"], int) and isinstance(image_id, int) for image_id, info in data.images.items())


def test_names_of_crowd_annotations_are_never_drawn_as_absent(shapes, tmp_path):
    def crowd(document, folder):
        document["annotations"][0]["iscrowd"] = 1

    data = CocoSegmentationData(_break(shapes, tmp_path, crowd))
    ann = data.annotations[0]
    index = data.image_ids.index(ann["image_id"])
    crowd_names = set(data._names(data.categories[ann["category_id"]]))
    for seed in range(20):
        sample = data.sample(index, np.random.default_rng(seed), input_size=56, mask_size=16, mean=[0.5] * 3, std=[0.5] * 3, negatives=20)
        assert not crowd_names & {p.text for p in sample.prompts if len(p.masks) == 0}, "a crowd of stars is no proof of 'no star'"


def _as_if_rotated(document, folder):
    info = next(i for i in document["images"] if i["width"] != i["height"])
    info["width"], info["height"] = info["height"], info["width"]  # as if EXIF-rotated
    for ann in document["annotations"]:
        if ann["image_id"] == info["id"]:
            ann["segmentation"]["size"] = [info["height"], info["width"]]
            ann["bbox"] = [0, 0, 1, 1]


def test_image_size_must_match_its_annotations(shapes, tmp_path):
    data = CocoSegmentationData(_break(shapes, tmp_path, _as_if_rotated))
    index = next(i for i, image_id in enumerate(data.image_ids) if data.images[image_id]["width"] != data.images[image_id]["height"])
    with pytest.raises(DataError, match="would not line up"):
        data.sample(index, np.random.default_rng(0), input_size=56, mask_size=16, mean=[0.5] * 3, std=[0.5] * 3)


def test_eval_refuses_an_image_whose_size_disagrees_with_its_annotations(shapes, tmp_path, segmenter):
    from sam3studio.evaluate import collect

    data = CocoSegmentationData(_break(shapes, tmp_path, _as_if_rotated))
    with pytest.raises(DataError, match="would not line up"):
        collect(segmenter, data, precision="fp32")


def test_category_loss_trains_a_head_that_resumes_and_stays_out_of_the_model(shapes, tiny_checkpoint, tmp_path):
    from sam3studio.train.criterion import LossWeights
    from sam3studio.train.loop import CATEGORY_HEAD_FILE

    weights = LossWeights(category=1.0)
    straight = train(_config(shapes, tiny_checkpoint, tmp_path / "straight", weights=weights))
    assert all("category" in entry["losses"] for entry in straight.history)
    half = train(_config(shapes, tiny_checkpoint, tmp_path / "halves", weights=weights), on_log=_stop_after(3))
    assert (tmp_path / "halves" / CHECKPOINT_DIR / CATEGORY_HEAD_FILE).is_file()
    resumed = train(_config(shapes, tiny_checkpoint, tmp_path / "halves", weights=weights))
    assert half.step == 3 and resumed.step == 6
    for a, b in ((straight.model, resumed.model), (straight.category_head, resumed.category_head)):
        wa, wb = _weights(a), _weights(b)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not any("category" in name for name in resumed.model.state_dict())
    with pytest.raises(ValueError, match="other settings .weights."):
        train(_config(shapes, tiny_checkpoint, tmp_path / "halves"))


def test_category_map_labels_each_pixel_with_its_instance_category(shapes):
    data = CocoSegmentationData(shapes)
    sample = data.sample(0, np.random.default_rng(0), input_size=56, mask_size=16, mean=[0.5] * 3, std=[0.5] * 3, flip=False)
    assert sample.categories.shape == (16, 16)
    present = {data.category_number[int(a["category_id"])] for a in data.by_image[data.image_ids[0]]}
    assert set(np.unique(sample.categories)) - {0} <= present
    assert (sample.categories > 0).any() and (sample.categories == 0).any()


def test_half_the_negatives_share_a_word_with_a_present_name():
    from sam3studio.train.data import _negatives

    vocabulary = ["blue star", "red star", "blue circle", "red circle", "star", "circle", "square", "green square"]
    present = ["blue star", "star"]
    absent = [n for n in vocabulary if n not in present]
    for seed in range(5):
        picked = _negatives(absent, present, 4, np.random.default_rng(seed))
        assert len(picked) == 4 == len(set(picked)) and not set(picked) & set(present)
        assert sum(bool({"blue", "star"} & set(n.split())) for n in picked) >= 2
    assert _negatives([], present, 4, np.random.default_rng(0)) == []


def test_coarse_negatives_are_absent_supercategories_and_default_to_none(shapes):
    data = CocoSegmentationData(shapes)
    assert data.coarse_names == ["circle", "square", "star", "triangle"]
    options = dict(input_size=56, mask_size=16, mean=[0.5] * 3, std=[0.5] * 3)
    for index in range(len(data)):
        present = set(data.ground_truth(index))
        absent_shapes = set(data.coarse_names) - present
        sample = data.sample(index, np.random.default_rng(index), negatives=3, coarse_negatives=1, **options)
        negatives = [p.text for p in sample.prompts if len(p.boxes) == 0]
        assert len(negatives) == 3 and not set(negatives) & present
        assert len(set(negatives) & absent_shapes) >= min(1, len(absent_shapes)), (negatives, present)
        # coarse_negatives=0 draws what the sampler drew before the option existed
        plain = data.sample(index, np.random.default_rng(index), negatives=3, **options)
        before = data.sample(index, np.random.default_rng(index), negatives=3, coarse_negatives=0, **options)
        assert [p.text for p in plain.prompts] == [p.text for p in before.prompts]


def test_supercategory_loss_labels_pixels_by_shape(shapes, tiny_checkpoint, tmp_path):
    from sam3studio.train.criterion import LossWeights

    weights = LossWeights(category=1.0, supercategory=1.0)
    config = _config(shapes, tiny_checkpoint, tmp_path, weights=weights)
    trainer = Trainer(config, *load_for_training(config))
    names, table = trainer.category_levels["supercategory"]
    assert names["input_ids"].shape[0] == 4 and table[0] == 0
    for cid, number in trainer.data.category_number.items():
        shape = trainer.data.categories[cid]["supercategory"]
        assert trainer.data.coarse_names[table[number] - 1] == shape
    losses = trainer.train_step()
    assert losses["supercategory"] > 0 and losses["category"] > 0


def test_dense_only_trains_the_encoders_and_leaves_the_decoders_alone(shapes, tiny_checkpoint, tmp_path):
    from sam3studio.train.criterion import LossWeights

    config = _config(shapes, tiny_checkpoint, tmp_path, dense_only=True, steps=30, weights=LossWeights(category=1.0, category_background=0.1))
    model, processor = load_for_training(config)
    before = _weights(model)
    trainer = train(config)
    after = _weights(trainer.model)
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"vision_encoder", "text_encoder", "text_projection"}, changed
    assert set(trainer.history[0]["losses"]) == {"category", "total"}
    totals = [entry["losses"]["total"] for entry in trainer.history]
    assert np.mean(totals[-5:]) < 0.8 * np.mean(totals[:5]), totals
    with pytest.raises(ValueError, match="category losses alone"):
        Trainer(_config(shapes, tiny_checkpoint, tmp_path / "none", dense_only=True), model, processor)


def test_dense_only_steps_train_position_channels_in_the_vision_features(shapes, tiny_checkpoint, tmp_path):
    from sam3studio.train.criterion import LossWeights

    weights = LossWeights(category=1.0, category_background=0.1, position=10.0)
    trainer = train(_config(shapes, tiny_checkpoint, tmp_path, dense_only=True, steps=30, weights=weights))
    assert set(trainer.history[0]["losses"]) == {"category", "position", "total"}
    position = [entry["losses"]["position"] for entry in trainer.history]
    assert np.mean(position[-5:]) < 0.8 * np.mean(position[:5]), position


def test_a_run_saved_before_a_setting_existed_resumes_at_its_default(shapes, tiny_checkpoint, tmp_path):
    half = train(_config(shapes, tiny_checkpoint, tmp_path), on_log=_stop_after(3))
    state_file = tmp_path / CHECKPOINT_DIR / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["config"]["coarse_negatives"], state["config"]["weights"]["supercategory"]
    state_file.write_text(json.dumps(state))
    assert half.step == 3 and train(_config(shapes, tiny_checkpoint, tmp_path)).step == 6
    with pytest.raises(ValueError, match="other settings .coarse_negatives."):
        train(_config(shapes, tiny_checkpoint, tmp_path, coarse_negatives=1))


def test_split_pixel_decoder_trains_exactly_as_the_plain_one(shapes, tiny_checkpoint, tmp_path, monkeypatch):
    """The per-image skip convolutions and phase kernels give the plain decoder's masks and
    gradients. (A fixed random weighting of the masks stands in for the set criterion, whose
    Hungarian matching can flip on near-ties of a random model's float rounding.)"""
    from sam3studio.speedups import PixelDecoderSkips
    from sam3studio.train.loop import forward_batch

    config = _config(shapes, tiny_checkpoint, tmp_path)
    trainer = Trainer(config, *load_for_training(config))
    trainer.model.train()

    def masks_and_gradients():
        trainer.model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same dropout in both runs
        predictions, _, _ = forward_batch(trainer.model, trainer.processor.tokenizer, trainer.batch(0), trainer.plan)
        weighting = torch.randn(predictions.masks.shape, generator=torch.Generator().manual_seed(1))
        (predictions.masks * weighting).sum().backward()
        return predictions.masks.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}

    split_masks, split_grads = masks_and_gradients()
    monkeypatch.setattr(PixelDecoderSkips, "training_skips", lambda self, features, rows: None)
    plain_masks, plain_grads = masks_and_gradients()
    assert torch.allclose(split_masks, plain_masks, atol=1e-4)
    assert split_grads.keys() == plain_grads.keys() and any("pixel_decoder.conv_layers" in n for n in split_grads)
    largest = max(g.norm() for g in plain_grads.values())
    for name, plain in plain_grads.items():  # (gradients that are zero in exact arithmetic are rounding noise)
        assert (split_grads[name] - plain).norm() <= 1e-3 * plain.norm() + 1e-6 * largest, name


def test_every_name_scores_are_the_models_own_scores_with_the_name_as_prompt(shapes, tiny_checkpoint, tmp_path):
    from sam3studio.train.criterion import LossWeights
    from sam3studio.train.loop import forward_batch

    config = _config(shapes, tiny_checkpoint, tmp_path, negatives_per_image=2, weights=LossWeights(every_name=1.0))
    trainer = Trainer(config, *load_for_training(config))
    trainer.model.eval()  # no dropout, so both passes compute the same thing
    samples = trainer.batch(0)
    with torch.no_grad():
        predictions, targets, _ = forward_batch(trainer.model, trainer.processor.tokenizer, samples, trainer.plan)
        every = trainer.every_name_logits(predictions.query_states)
    names = trainer.data.vocabulary
    assert every.shape == (*predictions.logits.shape[:1], len(names), *predictions.logits.shape[1:])
    for row, target in enumerate(targets):  # each row's own prompt, scored either way
        torch.testing.assert_close(every[:, names.index(target.text), row], predictions.logits[:, row], atol=1e-4, rtol=1e-4)
    losses = train(config).history
    assert all(entry["losses"]["every_name"] > 0 for entry in losses)


def test_pixel_name_accuracy_reads_the_category_head_a_run_trained(shapes, tiny_checkpoint, tmp_path):
    from sam3studio.train.criterion import LossWeights
    from sam3studio.train.probes import pixel_name_accuracy

    weights = LossWeights(category=1.0, category_background=0.0)  # object pixels alone, which is what the probe reads
    train(_config(shapes, tiny_checkpoint, tmp_path, dense_only=True, steps=40, weights=weights))
    read = pixel_name_accuracy(tmp_path / CHECKPOINT_DIR, shapes)
    assert read["pixels"] > 0
    assert 0.0 <= read["name"] <= min(read["first_word"], read["last_word"]) <= 1.0, read
    assert read["first_word"] > 1 / 6, read  # six colors: a head that learned nothing would be at chance
    assert read["objects"] > 0 and 0.0 <= read["small_object_last_word"] <= 1.0 and 0.0 <= read["object_last_word"] <= 1.0, read
    with pytest.raises(FileNotFoundError, match="no category_head"):
        pixel_name_accuracy(tiny_checkpoint, shapes)
