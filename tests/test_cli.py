"""The `sam3studio` command run as a user runs it: a subprocess on real files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"COLUMNS": "200", "SAM3STUDIO_NATIVE_BF16": "0"}
    return subprocess.run([sys.executable, "-m", "sam3studio.cli", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture
def photos(tmp_path, scene):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(scene).save(folder / "one.png")
    Image.fromarray(scene[:, ::-1]).save(folder / "two.jpg")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (folder / "notes.txt").write_text("not an image, and not picked up from a folder")
    return folder


def test_segment_folder_goes_on_past_a_bad_image(photos, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    proc = run("segment", str(photos), "-p", "red square, blue square", "--model", str(tiny_checkpoint),
               "--threshold", "0", "--refine", "1", "--format", "json,png,coco", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "broken.png" in proc.stderr and "2 of 3 images segmented" in proc.stderr
    assert {"one.json", "two.json", "coco.json", "one_overlay.png"} <= {p.name for p in out.iterdir()}
    document = json.loads((out / "one.json").read_text())
    assert document["width"] == 130 and document["height"] == 90 and document["instances"]
    assert document["precision"] == {"requested": "auto", "used": "fp32"}
    coco = json.loads((out / "coco.json").read_text())
    assert len(coco["images"]) == 2 and {c["name"] for c in coco["categories"]} <= {"red square", "blue square"}


def test_glob_and_box_exemplar(photos, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    proc = run("segment", str(photos / "*.png"), str(photos / "one.png"), "--box", "15,10,60,50",
               "--negative-box", "70,40,120,80", "--model", str(tiny_checkpoint), "--threshold", "0", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 1  # broken.png matched the glob
    labels = {i["label"] for i in json.loads((out / "one.json").read_text())["instances"]}
    assert labels == {"exemplar"}


def test_no_snap_edges_gives_the_bilinear_masks(photos, tiny_checkpoint, tmp_path):
    areas = []
    for flag in ("--snap-edges", "--no-snap-edges"):
        out = tmp_path / flag.strip("-")
        proc = run("segment", str(photos / "one.png"), "-p", "red square", "--model", str(tiny_checkpoint), "--threshold", "0", flag,
                   "--out", str(out), cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        areas.append([i["area"] for i in json.loads((out / "one.json").read_text())["instances"]])
    assert areas[0] and areas[1] and areas[0] != areas[1]


def test_explicit_bf16_on_a_cpu_without_it_warns_and_runs_fp32(photos, tiny_checkpoint, tmp_path):
    proc = run("segment", str(photos / "one.png"), "-p", "red square", "--precision", "bf16", "--model", str(tiny_checkpoint),
               "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "bf16 -> fp32" in proc.stderr and "no native bf16" in proc.stderr
    assert json.loads((tmp_path / "o" / "one.json").read_text())["precision"] == {"requested": "bf16", "used": "fp32"}


@pytest.mark.parametrize(
    "args,message",
    [
        (["--precision", "fp64"], "Unknown precision"),
        (["--threshold", "1.5"], "threshold must be"),
        (["--format", "tiff"], "Unknown --format"),
        (["--box", "1,2,3"], "four numbers"),
        (["--model", "demo-nope/x/y"], "owner/name"),
    ],
)
def test_bad_options_exit_2_with_one_line(photos, tiny_checkpoint, tmp_path, args, message):
    base = ["segment", str(photos / "one.png"), "-p", "dog", "--model", str(tiny_checkpoint)]
    proc = run(*base, *args, cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_empty_prompt_and_missing_glob(photos, tiny_checkpoint, tmp_path):
    proc = run("segment", str(photos / "one.png"), "-p", " , ", "--model", str(tiny_checkpoint), cwd=tmp_path)
    assert proc.returncode == 2 and "No prompt given" in proc.stderr
    proc = run("segment", str(photos / "*.webp"), "-p", "dog", "--model", str(tiny_checkpoint), cwd=tmp_path)
    assert proc.returncode == 2 and "No image file matches" in proc.stderr


def test_output_folder_that_is_a_file_and_a_dataset_name_clash(photos, tiny_checkpoint, tmp_path):
    blocker = tmp_path / "taken"
    blocker.write_text("a file, not a folder")
    proc = run("segment", str(photos / "one.png"), "-p", "dog", "--model", str(tiny_checkpoint), "--out", str(blocker), cwd=tmp_path)
    assert proc.returncode == 2 and "Cannot use" in proc.stderr and "Traceback" not in proc.stderr
    clash = tmp_path / "clash"
    clash.mkdir()
    (photos / "one.png").rename(clash / "coco.png")
    out = tmp_path / "out"
    proc = run("segment", str(clash), "-p", "red square", "--threshold", "0", "--model", str(tiny_checkpoint),
               "--format", "json,coco", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "images" in json.loads((out / "coco.json").read_text())
    assert json.loads((out / "coco_1.json").read_text())["image"] == "coco.png"


def test_info_reports_bf16_support_and_the_onnx_backend(tmp_path):
    proc = run("info", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "native bf16" in proc.stdout and "--precision auto" in proc.stdout and "runs fp32 on cpu" in proc.stdout
    assert "--backend onnxruntime" in proc.stdout and "available with --precision int8" in proc.stdout


def test_train_then_eval(tiny_checkpoint, tmp_path):
    from sam3studio.train.shapes import SceneConfig, write_dataset

    shapes = write_dataset(tmp_path / "shapes", 3, seed=2, config=SceneConfig(min_side=64, max_side=96, max_objects=2))
    run_dir = tmp_path / "run"
    proc = run("train", "--data", str(shapes), "--model", str(tiny_checkpoint), "--steps", "3", "--images-per-step", "2",
               "--image-size", "140", "--out", str(run_dir), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (run_dir / "checkpoint" / "model.safetensors").is_file() and "done: 3 steps" in proc.stderr
    assert json.loads((run_dir / "checkpoint" / "config.json").read_text())["vision_config"]["backbone_config"]["image_size"] == 140
    report = tmp_path / "reports" / "eval.json"  # its folder is made
    proc = run("eval", "--model", str(run_dir / "checkpoint"), "--data", str(shapes), "--precision", "fp32,bf16,int8",
               "--force-precision", "--threshold", "0.1", "--json", str(report), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(report.read_text())
    assert [r["precision"] for r in rows] == ["fp32 (ran fp32)", "bf16 (ran bf16)", "int8 (ran int8)"]
    assert all(0 <= r["miou"] <= 1 and r["images"] == 3 for r in rows)
    assert "mIoU" in proc.stdout
    for bad, message in ((["--limit", "0"], "--limit must be 1 or more"), (["--threshold", "1.5"], "threshold must be"),
                         (["--precision", "fp32,fp33"], "Unknown precision 'fp33'"), (["--views", "3"], "views must be one of 1, 2, 4")):
        proc = run("eval", "--model", str(run_dir / "checkpoint"), "--data", str(shapes), *bad, cwd=tmp_path)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_train_needs_data_or_a_preset(tmp_path):
    proc = run("train", "--out", str(tmp_path / "x"), cwd=tmp_path)
    assert proc.returncode == 2 and "--data" in proc.stderr
    proc = run("train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x"), cwd=tmp_path)
    assert proc.returncode == 2 and "no annotation file" in proc.stderr
    proc = run("train", "--data", str(tmp_path), "--image-size", "150", "--out", str(tmp_path / "x"), cwd=tmp_path)
    assert proc.returncode == 2 and "not a multiple of the model's 14-pixel patch" in proc.stderr
    proc = run("train", "--preset", "demo", "--lr", "0.1", "--seed", "3", "--out", str(tmp_path / "demo"), cwd=tmp_path)
    assert proc.returncode == 2 and "--lr, --seed cannot change it" in proc.stderr, "accepted and silently ignored before"
    assert not (tmp_path / "demo").exists(), "refused before any data is rendered"


def test_output_stems_differ_in_more_than_case():
    from sam3studio.cli import _unique_stem

    taken = {"coco"}
    assert [_unique_stem(s, taken) for s in ("Cat", "cat", "CAT", "COCO")] == ["Cat", "cat_1", "CAT_2", "COCO_1"]
