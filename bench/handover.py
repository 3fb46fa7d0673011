"""Benchmark: what a search hands over against the hand-tuned recipe, on the same test images.

Runs, as a user would, (1) `search` with a space on a data folder (trials, rescoring, final fit,
report) and (2) `train --config configs/cpu-shapes.json` on the same data, whose split (seed,
fractions) is the study's; then scores both models on the same test images with `evaluate` and
prints them side by side with their wall times. Everything lands under --out.

    python bench/handover.py --data ../shared/datasets/shapes [--space search_spaces/quick.yaml]
                             [--out runs/handover] [--skip-recipe] [--skip-search]
                             [--search-args "--gpus all --workers-per-gpu 2"]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, str(ROOT / "train_optuna.py")]


def timed(args: list[str], cwd: Path, log: Path) -> float:
    """Run the CLI with `args` in `cwd`, output to `log`; returns wall seconds."""
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run(
            [*CLI, *args], cwd=cwd, stdout=out, stderr=subprocess.STDOUT, check=False
        )
    if proc.returncode:
        sys.exit(f"error: {' '.join(args[:1])} failed ({proc.returncode}); see {log}")
    return time.perf_counter() - started


def test_score(model: Path, cwd: Path) -> dict:
    out = subprocess.run([*CLI, "evaluate", "--model", str(model), "--split", "test", "--json"],
                         cwd=cwd, capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--space", default=str(ROOT / "search_spaces" / "quick.yaml"))
    parser.add_argument("--recipe", default=str(ROOT / "configs" / "cpu-shapes.json"))
    parser.add_argument("--out", default=str(ROOT / "runs" / "handover"))
    parser.add_argument("--study", default="handover")
    parser.add_argument("--search-args", default="", help="more options for search, one string")
    parser.add_argument("--skip-search", action="store_true", help="reuse the finished study")
    parser.add_argument("--skip-recipe", action="store_true", help="reuse recipe.pt")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = str(Path(args.data).resolve())
    walls = {}
    if not args.skip_search:
        walls["search"] = timed(["search", "--space", str(Path(args.space).resolve()), "--study",
                                 args.study, "--data", data, *shlex.split(args.search_args)],
                                out, out / "search.log")  # fmt: skip
    best_pt = out / "reports" / args.study / "best.pt"
    best = json.loads((out / "reports" / args.study / "best.json").read_text())
    recipe = json.loads(Path(args.recipe).read_text())
    for key in ("seed", "val_fraction", "test_fraction", "train_on"):  # the study's split
        recipe[key] = best["config"][key]
    (out / "recipe.json").write_text(json.dumps(recipe, indent=1))
    if not args.skip_recipe:
        walls["recipe"] = timed(["train", "--config", "recipe.json", "--data", data, "--out",
                                 "recipe.pt", "--quiet"], out, out / "recipe.log")  # fmt: skip
    ours, theirs = test_score(best_pt, out), test_score(out / "recipe.pt", out)
    import torch

    split = torch.load(out / "recipe.pt", weights_only=True)["extra"]["split"]
    assert split == best["split"], "the recipe was not trained on the study's split"
    classes = list(ours["per_class"])
    print(f"data {data}: {len(split['train'])} train, {len(split['validation'])} validation, "
          f"{len(split['test'])} test images; both trained on {best['config']['train_on']}")  # fmt: skip
    print(f"  {'model':<44}{'test mIoU':>10}" + "".join(f"{c:>11}" for c in classes)
          + f"{'wall s':>9}")  # fmt: skip
    rows = [(f"search: best.pt (trial {best['trial']})", ours, walls.get("search")),
            ("recipe: configs/cpu-shapes.json", theirs, walls.get("recipe"))]  # fmt: skip

    def cell(value, width: int, digits: str) -> str:
        return f"{'-':>{width}}" if value is None else f"{value:>{width}{digits}}"

    for label, s, wall in rows:
        print(f"  {label:<44}{cell(s['miou'], 10, '.4f')}"
              + "".join(cell(s["per_class"][c], 11, ".4f") for c in classes)
              + cell(wall, 9, ".0f"))  # fmt: skip
    print(f"  search minus recipe: {ours['miou'] - theirs['miou']:+.4f} test mIoU")


if __name__ == "__main__":
    main()
