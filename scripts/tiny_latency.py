"""Latency of the core on the tiny random-weight model: a quick check of the pipeline's own
overhead (decoding, caching, batching, post-processing), not of SAM3's speed.

    .venv/bin/python scripts/tiny_latency.py

Prints medians of 20 calls and the CPU they ran on. `sam3studio bench` (issue 6) supersedes it.
"""

import statistics
import tempfile
import time
import warnings

import numpy as np

from sam3studio import load_segmenter
from sam3studio.checkpoints import build_random_checkpoint
from sam3studio.postprocess import select
from sam3studio.precision import cpu_info

PROMPTS = ["red car", "dog", "blue bag", "person", "tree", "green circle", "yellow star", "window", "cat", "road"]
RUNS = 20


def median_ms(call, arguments) -> float:
    times = []
    for argument in arguments:
        start = time.perf_counter()
        call(argument)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    warnings.simplefilter("ignore")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        seg = load_segmenter(str(build_random_checkpoint(folder)), precision="fp32", device="cpu")
        new_images = lambda: [rng.integers(0, 255, (480, 640, 3), dtype=np.uint8) for _ in range(RUNS)]  # noqa: E731
        seg.segment(new_images()[0], PROMPTS)  # warm-up; also caches the ten text embeddings
        one = median_ms(lambda image: seg.segment(image, PROMPTS[:1]), new_images())
        ten = median_ms(lambda image: seg.segment(image, PROMPTS), new_images())
        image = new_images()[0]
        raw = seg.predict(image, PROMPTS)
        # Thresholds spread over the scores actually produced, so that 100% to 10% of queries are kept.
        thresholds = [float(t) for t in np.quantile(raw.scores, np.linspace(0.0, 0.9, RUNS))]
        change = {level: median_ms(lambda t: select(raw, threshold=t, refine=level), thresholds) for level in (0, 1)}
        kept = statistics.median(len(select(raw, threshold=t).instances) for t in thresholds)
    cpu = cpu_info()
    print(f"CPU: {cpu.model}; bf16 flags: {', '.join(cpu.bf16_flags) or 'none'}; bf16 faster than fp32: {cpu.bf16_faster}")
    print(f"tiny model, 640x480 image, fp32, median of {RUNS}:")
    print(f"  new image + 1 prompt:   {one:7.1f} ms")
    print(f"  new image + 10 prompts: {ten:7.1f} ms (one batched pass)")
    print(f"  threshold change on cached outputs, median {kept:.0f} of 80 instances kept (random weights: speckled,")
    print(f"  image-wide masks, the worst case for refinement): refine 0 {change[0]:.1f} ms, refine 1 {change[1]:.1f} ms")


if __name__ == "__main__":
    main()
