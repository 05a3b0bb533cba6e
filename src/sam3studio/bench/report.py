"""The benchmark's report: the seed's table (mode, latency, memory, mIoU) extended with the
stages users ask about, every figure beside its ratio to plain `transformers` fp32."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .worker import BASELINE

# (stage key in the results, column title).
STAGES = (
    ("new_image_1_prompt", "new image + 1 prompt"),
    ("encode_image", "image encoding"),
    ("one_more_prompt", "one more prompt"),
    ("new_image_n_prompts", "new image + {n} prompts"),
    ("postprocess_refine0", "threshold change"),
    ("postprocess_refine1", "threshold change, refine 1"),
)


def median_p90(values: list[float]) -> tuple[float, float]:
    return float(np.median(values)), float(np.percentile(values, 90))


def summary(results: dict) -> list[dict]:
    """One row per run: medians, p90s, memory, quality and the ratios to the baseline."""
    runs = results["runs"]
    base = runs.get(BASELINE)
    rows = []
    for name, run in runs.items():
        row = {"mode": name, "used": run["precision_used"], "load_s": run["load_s"], "peak_rss_mb": run["peak_rss_mb"],
               "cuda_peak_mb": run["cuda_peak_mb"], "miou": (run["quality"] or {}).get("miou"),
               "agreement": results["mask_agreement"].get(name, 1.0 if name == "fp32" else None)}
        for stage, _ in STAGES:
            if run["timings_ms"].get(stage):
                row[stage], row[stage + "_p90"] = median_p90(run["timings_ms"][stage])
                if base and base["timings_ms"].get(stage):
                    row[stage + "_ratio"] = row[stage] / median_p90(base["timings_ms"][stage])[0]
        if base:
            row["peak_rss_ratio"] = run["peak_rss_mb"] / base["peak_rss_mb"]
            if run["cuda_peak_mb"] and base["cuda_peak_mb"]:
                row["cuda_peak_ratio"] = run["cuda_peak_mb"] / base["cuda_peak_mb"]
        rows.append(row)
    return rows


def markdown(results: dict) -> str:
    config, machine = results["config"], results["machine"]
    n = config["prompts"]
    titles = [title.format(n=n) for _, title in STAGES]
    cuda = config["device"].startswith("cuda")  # then the GPU's peak is the memory that matters
    lines = [
        f"Model `{config['model']}`, {config['images']} images of {config['size']}x{config['size']} px (after one warm-up), "
        f"{n} prompts; device {config['device']}.",
        f"CPU: {machine['cpu']}, {machine['cores']} cores, bf16 flags: {', '.join(machine['bf16_flags']) or 'none'} "
        f"(native bf16: {machine['native_bf16']}, faster than fp32: {machine['bf16_faster']}); "
        f"torch {machine['torch']}, transformers {machine['transformers']}.",
        "",
        "Times are medians (p90 in brackets) in milliseconds; ×N is the ratio to plain transformers fp32.",
        "",
        "| mode | runs as | " + " | ".join(titles) + (" | CUDA peak MB" if cuda else "") + " | peak RSS MB | load s | mIoU | mask agreement |",
        "|---" * (len(titles) + 6 + cuda) + "|",
    ]
    for row in summary(results):
        cells = [row["mode"], row["used"]]
        for stage, _ in STAGES:
            cells.append(_cell(row, stage))
        if cuda:
            cells.append(_number(row["cuda_peak_mb"], "{:.0f}") + (f" (×{row['cuda_peak_ratio']:.2f})" if "cuda_peak_ratio" in row else ""))
        rss = f"{row['peak_rss_mb']:.0f}" + (f" (×{row['peak_rss_ratio']:.2f})" if "peak_rss_ratio" in row else "")
        cells += [rss, f"{row['load_s']:.1f}", _number(row["miou"]), _number(row["agreement"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(row: dict, stage: str) -> str:
    if stage not in row:
        return "–"
    text = f"{_ms(row[stage])} ({_ms(row[stage + '_p90'])})"
    return text + (f" ×{row[stage + '_ratio']:.2f}" if stage + "_ratio" in row else "")


def _ms(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def _number(value, form: str = "{:.3f}") -> str:
    return "–" if value is None else form.format(value)


def chart(results: dict, path: Path) -> None:
    """Bars per mode: new image + 1 prompt, one more prompt, and peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary(results)
    names = [r["mode"] for r in rows]
    figure, axes = plt.subplots(1, 3, figsize=(12, 3.8), dpi=100)
    panels = (("new_image_1_prompt", "new image + 1 prompt (s)", 1e-3), ("one_more_prompt", "one more prompt (s)", 1e-3),
              ("peak_rss_mb", "peak RSS (GB)", 1 / 1024))
    for axis, (key, title, scale) in zip(axes, panels):
        axis.bar(names, [r.get(key, 0) * scale for r in rows], color=["#888" if n == BASELINE else "#3b7dd8" for n in names])
        axis.set_title(title, fontsize=10)
        axis.tick_params(axis="x", labelrotation=30, labelsize=8)
    figure.suptitle(f"{results['config']['model']} on {results['machine']['cpu']}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def write_report(results: dict, out: Path) -> None:
    results["summary"] = summary(results)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "report.md").write_text(markdown(results), encoding="utf-8")
    chart(results, out / "chart.png")
