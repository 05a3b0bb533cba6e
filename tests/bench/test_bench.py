"""The benchmark on the tiny checkpoint: every mode and the baseline in their own processes, a
report whose ratios refer to the baseline, and mask agreement that compares like with like."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sam3studio.bench import BenchConfig, BenchError, run_bench
from sam3studio.bench.runner import mask_agreement
from sam3studio.precision import PrecisionError


@pytest.fixture(scope="module")
def bench_results(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    config = BenchConfig(out=str(out), model=str(tiny_checkpoint), precisions=("fp32", "int8", "int8+onnxruntime"), size=96, images=1, prompts=2)
    return run_bench(config, on_progress=lambda _: None), out


def test_every_mode_and_the_baseline_are_measured(bench_results):
    results, out = bench_results
    assert set(results["runs"]) == {"transformers", "fp32", "int8", "int8+onnxruntime"}
    for run in results["runs"].values():
        assert run["peak_rss_mb"] > 100  # torch alone takes more; a missing measurement would be 0
        assert len(run["timings_ms"]["new_image_1_prompt"]) == 1  # the warm-up image is not reported
        assert all(v > 0 for v in run["timings_ms"]["new_image_1_prompt"])
    assert results["runs"]["int8"]["precision_used"] == "int8"
    assert results["runs"]["int8+onnxruntime"]["precision_used"] == "int8, images by onnxruntime"
    assert results["machine"]["cpu"]


def test_report_gives_ratios_to_the_baseline(bench_results):
    results, out = bench_results
    rows = {row["mode"]: row for row in json.loads((out / "results.json").read_text())["summary"]}
    assert rows["transformers"]["new_image_1_prompt_ratio"] == pytest.approx(1.0)
    fp32 = rows["fp32"]
    base = np.median(results["runs"]["transformers"]["timings_ms"]["new_image_1_prompt"])
    assert fp32["new_image_1_prompt_ratio"] == pytest.approx(fp32["new_image_1_prompt"] / base)
    table = (out / "report.md").read_text()
    assert "| int8 | int8 |" in table and "CPU: " in table
    assert (out / "chart.png").stat().st_size > 1000


def test_the_baseline_reuses_vision_features_for_more_prompts_as_documented(bench_results):
    results, out = bench_results
    base = results["runs"]["transformers"]["timings_ms"]
    assert set(base) >= {"encode_image", "one_more_prompt", "new_image_n_prompts"}
    assert base["new_image_n_prompts"][0] > base["encode_image"][0]
    rows = {row["mode"]: row for row in json.loads((out / "results.json").read_text())["summary"]}
    assert "encode_image_ratio" in rows["fp32"]


def test_masks_left_by_an_earlier_run_are_not_compared(tiny_checkpoint, tmp_path):
    rng = np.random.default_rng(0)
    stale = np.packbits(rng.random((1, 8, 16, 16)) > 0.5, axis=-1)
    np.savez(tmp_path / "masks-fp32.npz", image1_masks=stale, image2_masks=stale, image1_scores=rng.random((1, 8)))
    config = BenchConfig(out=str(tmp_path), model=str(tiny_checkpoint), precisions=("int8",), size=96, images=1, prompts=1, baseline=False)
    assert run_bench(config, on_progress=lambda _: None)["mask_agreement"] == {}


def test_int8_masks_mostly_agree_with_fp32(bench_results):
    results, _ = bench_results
    assert 0.5 < results["mask_agreement"]["int8"] <= 1.0
    assert 0.5 < results["mask_agreement"]["int8+onnxruntime"] <= 1.0


def test_mask_agreement_of_a_mode_with_itself_is_one_and_of_noise_is_low(tmp_path):
    rng = np.random.default_rng(0)
    masks = rng.random((2, 6, 16, 16)) > 0.5
    scores = rng.random((2, 6))
    np.savez(tmp_path / "masks-fp32.npz", image1_masks=np.packbits(masks, axis=-1), image1_scores=scores)
    np.savez(tmp_path / "masks-bf16.npz", image1_masks=np.packbits(masks, axis=-1), image1_scores=scores)
    np.savez(tmp_path / "masks-int8.npz", image1_masks=np.packbits(~masks, axis=-1), image1_scores=scores)
    agreement = mask_agreement(tmp_path, ["fp32", "bf16", "int8"])
    assert agreement == {"bf16": 1.0, "int8": 0.0}


@pytest.mark.parametrize("changes, message", [
    ({"images": 0}, "--images"), ({"prompts": 99}, "--prompts"), ({"size": 10}, "--size"),
])
def test_bad_settings_are_refused_before_anything_runs(tmp_path, changes, message):
    config = BenchConfig(out=str(tmp_path / "b"), **changes)
    with pytest.raises(BenchError, match=message):
        run_bench(config)
    assert not (tmp_path / "b").exists()


def test_unknown_precision_is_refused(tmp_path):
    with pytest.raises(PrecisionError, match="int8"):
        run_bench(BenchConfig(out=str(tmp_path), precisions=("fp8",)))
    with pytest.raises(BenchError, match="backend"):
        run_bench(BenchConfig(out=str(tmp_path), precisions=("int8+tensorrt",)))
