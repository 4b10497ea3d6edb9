"""Every recipe under recipes/ is a valid `lrc distill --config` file whose `# plan:` line is what `lrc plan`
gives today on the teacher's shipped config.json, and which fits the GPUs it names."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lrc.config import FIELDS, build_config, read_yaml

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
sys.path.insert(0, str(RECIPES))
import plan_recipes  # noqa: E402

NAMES = [p.name for p in plan_recipes.recipes()]


def test_the_issue_s_recipes_are_there():
    assert {"llama-3.2-3b-to-1.5b.yaml", "qwen2.5-7b-to-4b.yaml", "qwen3-8b-half.yaml",
            "llama-3.1-8b-half.yaml"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_recipe_plans_as_its_header_says_and_fits(name):
    # Catches a recipe that no longer parses (a renamed option), a teacher config missing from
    # recipes/teachers, and figures gone stale after a change to lrc.plan.estimate (rerun plan_recipes.py --write).
    path = RECIPES / name
    values = read_yaml(path)
    assert set(values) <= set(FIELDS) and "data" not in values and "out" not in values  # the user's to give
    cfg = build_config(values)
    assert (RECIPES / "teachers" / str(cfg.teacher) / "config.json").is_file()
    line = plan_recipes.plan_line(path)
    assert line in path.read_text(), f"stale: run `python recipes/plan_recipes.py --write`; now: {line}"
    plan = plan_recipes.plan_recipe(path)
    assert plan.peak_bytes < plan_recipes.GPU_GIB * 2**30 * 0.95  # leaves the CUDA context some room
    assert f"--config recipes/{name}" in path.read_text()
