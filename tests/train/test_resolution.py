import numpy as np
import pytest
import torch

from sam3studio.loading import load_model
from sam3studio.train.loop import CHECKPOINT_DIR, TrainConfig, load_for_training, train
from sam3studio.train.resolution import with_input_size
from sam3studio.train.shapes import SceneConfig, write_dataset

POSITIONS = "vision_encoder.backbone.embeddings.position_embeddings"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("shapes"), 4, seed=12, config=SceneConfig(min_side=64, max_side=112, max_objects=2))


def _config(shapes, tiny_checkpoint, out, **overrides) -> TrainConfig:
    options = dict(data=str(shapes), out=str(out), model=str(tiny_checkpoint), steps=2, images_per_step=2, lr=1e-3, warmup_steps=1,
                   log_every=1, precision="fp32", seed=3, image_size=168)
    return TrainConfig(**(options | overrides))


def test_a_new_input_size_changes_positions_and_sizes_only(tiny_checkpoint):
    original = load_model(str(tiny_checkpoint))
    before = {k: v.clone() for k, v in original.model.state_dict().items()}
    model, processor = with_input_size(original.model, original.processor, 168)  # 8x8 patches -> 12x12
    after = model.state_dict()
    assert after[POSITIONS].shape == (1, 144, before[POSITIONS].shape[-1])
    assert all(torch.equal(before[k], after[k]) for k in before if k != POSITIONS)
    assert processor.image_processor.size["height"] == 168 and processor.image_processor.mask_size["height"] == 48
    with torch.no_grad():
        out = model(pixel_values=torch.zeros(1, 3, 168, 168), **processor.tokenizer(["a square"], return_tensors="pt"))
    assert out.pred_masks.shape[-2:] == (48, 48)


def test_positions_are_resampled_as_the_model_saw_them(tiny_checkpoint):
    """The tiny model tiles a 4x4 embedding over its 8x8 patches: a ramp along x becomes two
    ramps side by side, and the 12x12 result must keep both, along x, not y."""
    loaded = load_model(str(tiny_checkpoint))
    embeddings = loaded.model.vision_encoder.backbone.embeddings
    side = int(embeddings.position_embeddings.shape[1] ** 0.5)
    ramp = torch.arange(side, dtype=torch.float32).repeat(side)  # x, row by row
    with torch.no_grad():
        embeddings.position_embeddings.copy_(ramp[None, :, None].expand_as(embeddings.position_embeddings))
    model, _ = with_input_size(loaded.model, loaded.processor, 168)
    grid = model.state_dict()[POSITIONS][0, :, 0].reshape(12, 12).numpy()
    assert np.allclose(grid, grid[:1]), "every row alike: the ramp runs along x"
    seen = np.tile(np.arange(side), 2)  # what the 8 patch columns saw
    expected = np.interp((np.arange(12) + 0.5) * 8 / 12 - 0.5, np.arange(8), seen)
    assert np.corrcoef(grid[0], expected)[0, 1] > 0.9


def test_same_size_is_a_no_op_and_odd_sizes_fail(tiny_checkpoint):
    loaded = load_model(str(tiny_checkpoint))
    assert with_input_size(loaded.model, loaded.processor, 112) == (loaded.model, loaded.processor)
    with pytest.raises(ValueError, match="multiple of the 14-pixel patch"):
        with_input_size(loaded.model, loaded.processor, 150)


def test_fine_tuning_at_a_new_size_saves_and_resumes_at_it(shapes, tiny_checkpoint, tmp_path):
    trainer = train(_config(shapes, tiny_checkpoint, tmp_path / "run"))
    assert trainer.step == 2
    saved = load_model(str(tmp_path / "run" / CHECKPOINT_DIR))
    assert saved.model.config.vision_config.backbone_config.image_size == 168
    assert saved.processor.image_processor.mask_size == {"height": 48, "width": 48}
    resumed, _ = load_for_training(_config(shapes, tiny_checkpoint, tmp_path / "run", steps=3))
    assert resumed.config.vision_config.backbone_config.image_size == 168
    with pytest.raises(ValueError, match="other settings .image_size."):
        train(_config(shapes, tiny_checkpoint, tmp_path / "run", image_size=None))
