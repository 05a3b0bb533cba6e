import numpy as np
import pytest
import torch

from sam3studio.train.criterion import LossWeights
from sam3studio.train.data import PromptTarget
from sam3studio.train.denoising import (
    DenoisingOutput,
    _decode,
    denoising_losses,
    denoising_pass,
    noised_boxes,
)
from sam3studio.train.loop import LayerCapture, TrainConfig, Trainer, forward_batch, load_for_training, train
from sam3studio.train.shapes import SceneConfig, write_dataset


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("shapes"), 4, seed=5, config=SceneConfig(min_side=64, max_side=112, max_objects=3))


def _trainer(shapes, tiny_checkpoint, out, **overrides) -> Trainer:
    config = TrainConfig(**dict(data=str(shapes), out=str(out), model=str(tiny_checkpoint), steps=4, images_per_step=2, lr=1e-3, warmup_steps=1,
                                log_every=1, precision="fp32", seed=2) | overrides)
    return Trainer(config, *load_for_training(config))


def test_noised_boxes_stay_near_their_box():
    torch.manual_seed(0)
    boxes = torch.tensor([[0.2, 0.3, 0.4, 0.7]]).repeat(2000, 1)
    assert torch.allclose(noised_boxes(boxes, 0.0), boxes, atol=1e-6)
    moved = noised_boxes(boxes, 0.4)
    center_shift = ((moved[:, :2] + moved[:, 2:]) / 2 - torch.tensor([0.3, 0.5])).abs()
    size_ratio = (moved[:, 2:] - moved[:, :2]) / torch.tensor([0.2, 0.4])
    assert (center_shift <= torch.tensor([0.2 * 0.2, 0.2 * 0.4]) + 1e-6).all()
    assert size_ratio.min() >= 0.6 - 1e-5 and size_ratio.max() <= 1.4 + 1e-5
    assert size_ratio.min() < 0.7 and size_ratio.max() > 1.3, "the whole range is used"
    edge = noised_boxes(torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(100, 1), 0.4)
    assert edge.min() >= 0 and edge.max() <= 1


def test_the_decoder_loop_reproduces_the_models_own_decoder(shapes, tiny_checkpoint, tmp_path):
    """From the learned reference boxes and query embeddings, `_decode` must give exactly what
    `Sam3Model.forward` gives: the same boxes at every layer and the same masks."""
    trainer = _trainer(shapes, tiny_checkpoint, tmp_path)
    model = trainer.model.eval()
    capture = LayerCapture(model)  # a second one beside forward_batch's: the decoder inputs are kept after it
    try:
        with torch.no_grad():
            predictions, targets, _ = forward_batch(model, trainer.processor.tokenizer, trainer.batch(0), trainer.plan)
            decoder = model.detr_decoder
            rows = len(targets)
            reference = decoder.reference_points.weight.sigmoid()[None].expand(rows, -1, -1)
            content = decoder.query_embed.weight[None].expand(rows, -1, -1)
            boxes, hidden = _decode(decoder, capture.decoder_inputs, reference, content)
            masks = torch.einsum("bqc,bchw->bqhw", model.mask_decoder.mask_embedder(hidden), predictions.mask_features)
    finally:
        capture.close()
    assert torch.allclose(boxes, predictions.boxes, atol=1e-5)
    assert torch.allclose(masks, predictions.masks, atol=1e-4)


def test_denoising_queries_train_the_decoder(shapes, tiny_checkpoint, tmp_path):
    trainer = _trainer(shapes, tiny_checkpoint, tmp_path, denoising_groups=2)
    capture = LayerCapture(trainer.model)
    try:
        predictions, targets, _ = forward_batch(trainer.model, trainer.processor.tokenizer, trainer.batch(0), trainer.plan)
        output = denoising_pass(trainer.model, capture.decoder_inputs, predictions.mask_features, targets, groups=2, noise=0.4)
    finally:
        capture.close()
    objects = [len(t.boxes) for t in targets]
    assert max(objects) > 0 and min(objects) == 0, "the batch has objects and a negative prompt"
    layers = trainer.model.config.detr_decoder_config.num_layers
    assert output.boxes.shape == (layers, len(targets), 2 * max(objects), 4)
    assert output.masks.shape[:2] == (len(targets), 2 * max(objects))
    assert [len(t.boxes) for t in output.targets] == [2 * n for n in objects]
    losses = denoising_losses(output, trainer.config.weights)
    assert set(losses) == {"denoise_box_l1", "denoise_box_giou", "denoise_mask_focal", "denoise_mask_dice"}
    sum(losses.values()).backward()
    decoder = trainer.model.detr_decoder
    for part in (decoder.box_head, decoder.layers[0].vision_cross_attn, decoder.query_embed, trainer.model.mask_decoder.mask_embedder):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters()), part

    trainer.step = 0
    logged = trainer.train_step()
    assert all(np.isfinite(v) for v in logged.values())
    assert logged["denoise_box_l1"] > 0 and logged["total"] > sum(logged[k] for k in ("classification", "box_l1", "box_giou"))


def test_denoising_losses_are_zero_for_exact_answers():
    masks = np.zeros((1, 8, 8), np.float32)
    masks[0, 2:6, 2:6] = 1
    target = PromptTarget("red square", masks, np.array([[0.25, 0.25, 0.75, 0.75]], np.float32))
    negative = PromptTarget("blue star", np.zeros((0, 8, 8), np.float32), np.zeros((0, 4), np.float32))
    boxes = torch.tensor([[0.25, 0.25, 0.75, 0.75]]).repeat(3, 2, 1, 1)  # 3 layers, 2 rows, 1 query
    exact = torch.where(torch.from_numpy(masks) > 0, 30.0, -30.0)
    losses = denoising_losses(DenoisingOutput(boxes, torch.stack([exact, -exact]), [target, negative]), LossWeights())
    assert all(float(v) < 1e-4 for v in losses.values()), losses
    wrong = denoising_losses(DenoisingOutput(torch.tensor([0.0, 0.0, 0.2, 0.2]).repeat(3, 2, 1, 1), torch.stack([-exact, exact]), [target, negative]), LossWeights())
    assert all(float(v) > 0.5 for k, v in wrong.items() if k != "denoise_mask_focal") and float(wrong["denoise_mask_focal"]) > 1


def test_a_run_with_denoising_and_position_channels_saves_and_resumes(shapes, tiny_checkpoint, tmp_path):
    config = TrainConfig(data=str(shapes), out=str(tmp_path / "run"), model=str(tiny_checkpoint), steps=2, images_per_step=2, warmup_steps=1,
                         log_every=1, precision="fp32", denoising_groups=1, weights=LossWeights(position=5.0))
    trainer = train(config)
    logged = trainer.history[-1]["losses"]
    assert trainer.step == 2 and "denoise_mask_dice" in logged and logged["position"] > 0
    with pytest.raises(ValueError, match="denoising_groups"):
        train(TrainConfig(**{**config.__dict__, "denoising_groups": 2}))
