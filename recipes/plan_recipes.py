"""The `# plan:` line of every recipe, from `lrc plan` on the teacher's published config.json (shipped under
recipes/teachers/, so no download): GPUs, peak memory per GPU, tokens/s and the time for the recipe's tokens.

    python recipes/plan_recipes.py           # print each recipe's line, and whether its file still says it
    python recipes/plan_recipes.py --write   # rewrite the lines in the files (after a change to lrc.plan.estimate)

tests/cli/test_recipes.py checks that every recipe's file holds the line this computes, so none goes stale.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
GPUS, GPU_NAME, GPU_GIB, TFLOPS, MFU = 8, "H100 80GB", 80, 989.0, 0.4  # bf16 dense peak of an H100 SXM
PLAN_LINE = re.compile(r"^# plan: .*$", re.M)


def recipes() -> list[Path]:
    return sorted(HERE.glob("*.yaml"))


def plan_recipe(path: Path):
    """`lrc plan --config PATH --nproc 8 --device cuda --device-tflops 989` with the shipped teacher config."""
    from lrc.config import build_config, read_yaml
    from lrc.model.teacher import load_teacher_config
    from lrc.plan.estimate import plan_from_config

    values = read_yaml(path)
    cfg = build_config(values)
    config = load_teacher_config(str(HERE / "teachers" / str(cfg.teacher)), False)
    return plan_from_config(config, cfg, nproc=GPUS, device="cuda", device_tflops=TFLOPS, mfu=MFU)


def plan_line(path: Path) -> str:
    from lrc.log import human_count, human_duration
    from lrc.plan.memory import GiB

    p = plan_recipe(path)
    return (f"# plan: {GPUS} x {GPU_NAME} ({TFLOPS:g} TFLOP/s bf16, {MFU:.0%} assumed): peak "
            f"{p.peak_bytes / GiB:.1f} GiB per GPU, {p.tokens_per_s * GPUS:,.0f} tokens/s, "
            f"{human_duration(p.hours)} for {human_count(p.budget_tokens)} tokens; student {p.student_shape}, "
            f"{human_count(p.student_params)} parameters")


def main() -> int:
    a = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a.add_argument("--write", action="store_true", help="rewrite each recipe's `# plan:` line")
    args = a.parse_args()
    stale = 0
    for path in recipes():
        line, text = plan_line(path), path.read_text()
        if args.write:
            path.write_text(PLAN_LINE.sub(line, text, count=1))
        current = line in path.read_text()
        stale += not current
        print(f"{path.name}: {line[2:]}{'' if current else '   (STALE in the file)'}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
