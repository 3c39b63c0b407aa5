"""Every YAML under recipes/ parses strictly with its stage's dataclasses, and its first line is the command."""

import importlib
from pathlib import Path

import pytest

from alignment.cli import STAGES

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
YAMLS = sorted(p for p in RECIPES.rglob("*.y*ml") if p.suffix in (".yaml", ".yml"))
NOT_STAGE_CONFIGS = {"pipeline", "accelerate", "fsdp", "deepspeed", "ddp"}  # read by `align run` or by accelerate, not a stage


def stage_of(path: Path) -> str | None:
    stem = path.stem
    if any(stem.startswith(p) for p in NOT_STAGE_CONFIGS):
        return None
    if stem in STAGES:
        return stem
    for stage in STAGES:  # e.g. sft_lora.yaml, dpo-ipo.yaml
        if stem.startswith((stage + "_", stage + "-")):
            return stage
    raise AssertionError(f"{path}: cannot tell its stage from the file name; name it <stage>.yaml or <stage>_<variant>.yaml")


def test_there_are_recipes():
    assert YAMLS, "no recipes found"


@pytest.mark.parametrize("path", YAMLS, ids=[str(p.relative_to(RECIPES)) for p in YAMLS])
def test_recipe_parses(path, monkeypatch):
    first = path.read_text().splitlines()[0]
    stage = stage_of(path)
    if stage is None:
        assert first.startswith("#"), f"{path}: first line should be a comment"
        return
    assert first.startswith("# ") and "align " in first or "accelerate launch" in first or "torchrun" in first, \
        f"{path}: the first line must be a comment with the command that runs it"
    module = importlib.import_module(STAGES[stage][0])
    captured = []
    monkeypatch.setattr(module, "main", lambda *cfgs, **kw: captured.append(cfgs))
    argv = ["tinyworld"] if stage == "data" else []
    module.cli(argv + ["--config", str(path)])
    assert captured, f"{path}: cli() did not reach main()"
