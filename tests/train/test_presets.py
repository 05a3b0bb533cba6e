"""The demo recipe's export step, run on the tiny checkpoint and tiny shapes sets: it installs
the model files only, with a calibrated threshold, test scores in fp32 and bf16, and a card.
And the sin/cos position table a fresh demo model can start from."""

import json
import shutil
from types import SimpleNamespace

import torch
from safetensors.torch import save_file

from sam3studio.loading import SETTINGS_FILE, load_model
from sam3studio.train.loop import TrainConfig, load_for_training
from sam3studio.train.presets import (DEMO_IMAGE_SIZE, SINCOS_POSITION_NORM, build_demo_model, demo_position_encoder_polish_stage,
                                      demo_training_stages, export_demo_model, sincos_position_embeddings, training_notes)
from sam3studio.train.resolution import with_input_size
from sam3studio.train.shapes import SceneConfig, write_dataset


def test_export_installs_a_loadable_model_with_threshold_scores_and_card(tiny_checkpoint, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, checkpoint)
    save_file({"0.exp_avg": torch.zeros(2)}, checkpoint / "optimizer.safetensors")  # trainer files stay behind
    (checkpoint / "trainer_state.json").write_text("{}")
    scenes = SceneConfig(min_side=64, max_side=96, max_objects=2)
    splits = {name: write_dataset(tmp_path / name, 3, seed=seed, config=scenes) for name, seed in (("val", 1), ("test", 2))}
    reports = export_demo_model(checkpoint, splits, tmp_path / "demo", notes={"steps": 6})
    installed = {p.name for p in (tmp_path / "demo").iterdir()}
    assert {"config.json", "model.safetensors", SETTINGS_FILE, "eval.json", "README.md"} <= installed
    assert not installed & {"optimizer.safetensors", "trainer_state.json"}
    assert [r["precision"] for r in reports] == ["fp32", "bf16"]
    settings = json.loads((tmp_path / "demo" / SETTINGS_FILE).read_text())
    installed = load_model(tmp_path / "demo")
    assert (installed.score_threshold, installed.mask_confidence_power) == (settings["score_threshold"], settings["mask_confidence_power"])
    card = (tmp_path / "demo" / "README.md").read_text()
    assert "| fp32 |" in card and "| bf16 |" in card and "- steps: 6" in card
    assert "| fp32, color + shape prompts |" in card and "| fp32, shape-only prompts |" in card
    assert "112 px input, 32x32 masks" in card  # the tiny model's own sizes


def linear_position_r2(table: torch.Tensor, grid: int) -> torch.Tensor:
    """R^2 of x and of y, fitted linearly from a (grid * grid, width) position table."""
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij")
    where = torch.stack([xs.flatten(), ys.flatten()], 1)
    design = torch.cat([table.double(), torch.ones(grid * grid, 1, dtype=torch.float64)], 1)
    fitted = design @ torch.linalg.lstsq(design, where).solution
    return 1 - ((fitted - where) ** 2).sum(0) / ((where - where.mean(0)) ** 2).sum(0)


def test_sincos_position_table_tells_every_patch_apart_and_reads_out_linearly():
    grid = 12
    table = sincos_position_embeddings(grid, 32)
    assert torch.allclose(table.norm(dim=1), torch.full((grid * grid,), SINCOS_POSITION_NORM))
    assert torch.cdist(table, table).add(torch.eye(grid * grid)).min() > 0.01, "no two patches share a code"
    r2 = linear_position_r2(table, grid)
    assert (r2 > 0.99).all(), r2


def test_the_resolution_stage_stretches_the_sincos_table_without_losing_the_position():
    model, processor = build_demo_model(sincos_positions=True)
    resized, _ = with_input_size(model, processor, 420)
    table = resized.vision_encoder.backbone.embeddings.position_embeddings.detach()[0]
    assert table.shape == (30 * 30, 112)
    r2 = linear_position_r2(table, 30)
    assert (r2 > 0.99).all(), r2


def test_a_fresh_run_starts_from_the_sincos_table_only_when_asked(tmp_path):
    waves = sincos_position_embeddings(DEMO_IMAGE_SIZE // 14, 112)[None]
    for asked in (True, False):
        model, _ = load_for_training(TrainConfig(data=str(tmp_path), out=str(tmp_path / str(asked)), sincos_positions=asked))
        table = model.vision_encoder.backbone.embeddings.position_embeddings.detach()
        assert torch.equal(table, waves) is asked


def test_the_demo_recipe_keeps_positions_from_scratch_and_chains_its_stages(tmp_path):
    stages = demo_training_stages(str(tmp_path), str(tmp_path / "data"))
    encoder, encoder_polish, detector, polish, resolution, refine = stages
    assert encoder.model is None and encoder.sincos_positions and encoder.dense_only
    assert encoder_polish == demo_position_encoder_polish_stage(str(tmp_path), str(tmp_path / "data"))
    assert detector.model == str(tmp_path / "encoder-polish" / "checkpoint") and not detector.dense_only
    assert polish.model == str(tmp_path / "detector-position" / "checkpoint") and polish.lr < detector.lr
    assert resolution.model == str(tmp_path / "polish-position" / "checkpoint") and resolution.image_size == 420 > polish.image_size
    assert refine.model == str(tmp_path / "resolution-position" / "checkpoint") and refine.image_size == 420 and refine.lr < resolution.lr
    assert refine.seed != resolution.seed  # new batches: a batch depends on (seed, step) alone
    assert {stage.weights.position for stage in stages} == {20.0}
    unstarted = [SimpleNamespace(config=stage, history=[], step=0) for stage in stages]  # what training_notes reads of a Trainer
    recipe = training_notes(unstarted)["recipe"]
    assert recipe.count("sin/cos") == 1 and "'position': 20.0" in recipe  # only the stage that starts the table names it
    assert recipe.count("seed 3,") == recipe.count("seed 1,") == 1 and recipe.count("seed 0,") == 4  # which batches each stage saw


def test_the_encoder_polish_continues_the_encoder_stage_lower_on_new_batches(tmp_path):
    encoder = demo_training_stages(str(tmp_path), str(tmp_path / "data"))[0]
    polish = demo_position_encoder_polish_stage(str(tmp_path), str(tmp_path / "data"))
    assert polish.model == str(tmp_path / "encoder-position" / "checkpoint") and polish.out == str(tmp_path / "encoder-polish")
    assert polish.dense_only and polish.lr < encoder.lr and polish.seed != encoder.seed
    assert not polish.sincos_positions  # the table comes trained from the encoder stage
