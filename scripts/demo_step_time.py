"""Training step time of the demo recipe's stages in fp32 and in bf16 on this machine: the
figures the README and the demo model's card quote.

    .venv/bin/python scripts/demo_step_time.py --data runs/demo/data/train --rounds 10

Speed does not depend on weight values, so every stage runs from a fresh demo model (in a
temporary folder) through the trainer's own loop. The two precisions alternate step by step in
one process, because these shared machines drift by ±15% over minutes; medians are printed
with the CPU they ran on. Leave the machine otherwise idle: a training run beside it halves
both figures.
"""

import argparse
import statistics
import tempfile
from dataclasses import replace

from sam3studio.precision import cpu_info, resolve
from sam3studio.train.loop import Trainer, load_for_training
from sam3studio.train.presets import demo_training_stages

MODES = ("fp32", "bf16")
WARMUP_STEPS = 2


def timed_steps(trainer: Trainer, count: int) -> list[float]:
    """Seconds of each of the next `count` steps, as the training loop logs them."""
    trainer.config = replace(trainer.config, steps=trainer.step + count)
    trainer.run()
    return [entry["seconds"] for entry in trainer.history[-count:]]


def stage_medians(config, rounds: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as scratch:
        trainers = {}
        for mode in MODES:
            timed = replace(config, out=f"{scratch}/{mode}", model=None, precision=mode, force_precision=True,
                            log_every=1, checkpoint_every=10**9)
            trainers[mode] = Trainer(timed, *load_for_training(timed))
            timed_steps(trainers[mode], WARMUP_STEPS)
        seconds = {mode: [] for mode in MODES}
        for _ in range(rounds):
            for mode in MODES:
                seconds[mode] += timed_steps(trainers[mode], 1)
    return {mode: statistics.median(values) for mode, values in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="the demo's training split (prepare_demo_data renders it)")
    parser.add_argument("--rounds", type=int, default=10, help="timed steps per stage and precision")
    parser.add_argument("--stages", default="1,2", help="which stages to time (the polish stage, 3, steps as the detector stage, 2, does; 4 is that at 420 px)")
    args = parser.parse_args()
    cpu = cpu_info()
    speeds = f"matmul fp32 {cpu.fp32_gflops:.0f} / bf16 {cpu.bf16_gflops:.0f} GFLOP/s" if cpu.fp32_gflops else "bf16 matmul not timed"
    print(f"CPU: {cpu.model}; bf16 flags: {', '.join(cpu.bf16_flags) or 'none'}; {speeds}; 'auto' trains in {resolve('auto').used.value}")
    with tempfile.TemporaryDirectory() as out:
        wanted = {int(n) for n in args.stages.split(",")}
        for number, config in enumerate(demo_training_stages(out, args.data), start=1):
            if number not in wanted:
                continue
            medians = stage_medians(config, args.rounds)
            ratio = medians["bf16"] / medians["fp32"]
            print(f"stage {number} ({config.images_per_step} images a step): fp32 {medians['fp32']:.2f} s, bf16 {medians['bf16']:.2f} s "
                  f"({ratio:.2f}x), medians of {args.rounds}")


if __name__ == "__main__":
    main()
