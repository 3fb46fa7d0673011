"""Benchmark: what a search hands over against the hand-tuned recipe, on the same test images.

Runs, as a user would, (1) `search` with a space on a data folder (trials, rescoring, final fit,
report) and (2) `train --config configs/cpu-shapes.json` on the same data, whose split (seed,
fractions) is the study's; then scores both models on the same test images with `evaluate` and
prints them side by side with their wall times. Everything lands under --out.

    python bench/handover.py --data ../shared/datasets/shapes [--space search_spaces/quick.yaml]
                             [--out runs/handover] [--repeats 3] [--skip-recipe] [--skip-search]
                             [--search-args "--gpus all --workers-per-gpu 2"]
                             [--space auto --warm-start-alone]

With --repeats N the search runs N times with sampler seeds 0..N-1 (`search --seed`), the same
split each time, and the spread between their best.pt test figures is printed: which model a
user gets should not depend on the run. With --warm-start-alone the first search's warm start
(with `--space auto`, the planned centre) is also trained alone with its final config (or, where
the promotion stage trained it with that very config, its finalist model is scored): what the
search adds over where it started.
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


def warm_start_config(folder: Path, study: str) -> tuple[dict, Path | None]:
    """The final config of a finished study's warm-start trial (what it would hand over alone),
    and its finalist model file where the promotion stage trained exactly that config (final
    `train_on: train`, no `promote:` section), so that it need not be trained again."""
    sys.path.insert(0, str(ROOT))
    from segcore.config import TrialConfig
    from segsearch.final import warm_start_number
    from segsearch.promote import finalist_path, promotion_config
    from segsearch.space import final_config
    from segsearch.study import open_study
    from train_optuna import quiet_optuna

    quiet_optuna(False)  # the heartbeat's ExperimentalWarning, as the CLI does
    found, space = open_study(study, f"sqlite:///{folder}/storage/{study}.db")
    number = warm_start_number(found)
    if number is None:
        sys.exit(f"error: study {study} has no warm start")
    cfg = final_config(TrialConfig.from_dict(found.trials[number].user_attrs["config"]), space)
    model = folder / finalist_path(study, number)
    same = model.is_file() and promotion_config(found, space, number) == cfg
    return cfg.to_dict(), model if same else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--space", default=str(ROOT / "search_spaces" / "quick.yaml"))
    parser.add_argument("--recipe", default=str(ROOT / "configs" / "cpu-shapes.json"))
    parser.add_argument("--out", default=str(ROOT / "runs" / "handover"))
    parser.add_argument("--study", default="handover")
    parser.add_argument("--repeats", type=int, default=1,
                        help="searches with sampler seeds 0..N-1, each in OUT/run-SEED")  # fmt: skip
    parser.add_argument("--search-args", default="", help="more options for search, one string")
    parser.add_argument("--skip-search", action="store_true", help="reuse the finished studies")
    parser.add_argument("--skip-recipe", action="store_true", help="reuse recipe.pt")
    parser.add_argument("--warm-start-alone", action="store_true",
                        help="also train the first search's warm start alone with its final "
                             "config (warm.pt): what the search adds over its own start")  # fmt: skip
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = str(Path(args.data).resolve())
    runs = []  # (label, folder, best.json, wall)
    for seed in range(args.repeats):
        folder = out / f"run-{seed}" if args.repeats > 1 else out
        folder.mkdir(exist_ok=True)
        wall = None
        if not args.skip_search:
            space = args.space if args.space == "auto" else str(Path(args.space).resolve())
            wall = timed(["search", "--space", space, "--study",
                          args.study, "--data", data, "--seed", str(seed),
                          *shlex.split(args.search_args)], folder, folder / "search.log")  # fmt: skip
        best = json.loads((folder / "reports" / args.study / "best.json").read_text())
        runs.append((f"search seed {seed}: best.pt (trial {best['trial']})", folder, best, wall))
    best = runs[0][2]
    if any(b["split"] != best["split"] for _, _, b, _ in runs):
        sys.exit("error: the searches' splits differ")
    recipe = json.loads(Path(args.recipe).read_text())
    for key in ("seed", "val_fraction", "test_fraction", "train_on"):  # the study's split
        recipe[key] = best["config"][key]
    (out / "recipe.json").write_text(json.dumps(recipe, indent=1))
    recipe_wall = None
    if not args.skip_recipe:
        recipe_wall = timed(["train", "--config", "recipe.json", "--data", data, "--out",
                             "recipe.pt", "--quiet"], out, out / "recipe.log")  # fmt: skip
    theirs = test_score(out / "recipe.pt", out)
    import torch

    extra = torch.load(out / "recipe.pt", weights_only=True)["extra"]
    split = extra["split"]
    assert split == best["split"], "the recipe was not trained on the study's split"
    rows = [(label, test_score(folder / "reports" / args.study / "best.pt", folder), wall)
            for label, folder, _, wall in runs]  # fmt: skip
    alone = [(f"seed {seed}: trial {b['trial']} alone, not ensembled", b["test_single"], None)
             for seed, (_, _, b, _) in enumerate(runs) if b.get("test_single")]  # fmt: skip
    if args.warm_start_alone:
        folder = runs[0][1]
        cfg, finalist = warm_start_config(folder, args.study)
        (out / "warm.json").write_text(json.dumps(cfg, indent=1))
        if finalist is None:
            wall = timed(["train", "--config", "warm.json", "--data", data, "--out", "warm.pt",
                          "--quiet"], out, out / "warm.log")  # fmt: skip
            alone.append(
                ("warm start alone (its final config)", test_score(out / "warm.pt", out), wall)
            )
        else:  # the promotion stage trained it with that config: its finalist model
            alone.append(("warm start alone (its finalist model)", test_score(finalist, out), None))
    classes = list(theirs["per_class"])
    print(f"data {data}: {len(split['train'])} train, {len(split['validation'])} validation, "
          f"{len(split['test'])} test images; the search's model trained on "
          f"{best['config']['train_on']}, the recipe on {extra['train_on']}")  # fmt: skip
    print(f"  {'model':<44}{'test mIoU':>10}" + "".join(f"{c:>11}" for c in classes)
          + f"{'wall s':>9}")  # fmt: skip

    def cell(value, width: int, digits: str) -> str:
        return f"{'-':>{width}}" if value is None else f"{value:>{width}{digits}}"

    recipe_row = ("recipe: " + Path(args.recipe).name, theirs, recipe_wall)
    for label, s, wall in [*rows, *alone, recipe_row]:
        print(f"  {label:<44}{cell(s['miou'], 10, '.4f')}"
              + "".join(cell(s["per_class"][c], 11, ".4f") for c in classes)
              + cell(wall, 9, ".0f"))  # fmt: skip
    gains = [s["miou"] - theirs["miou"] for _, s, _ in rows]
    print("  search minus recipe: " + ", ".join(f"{g:+.4f}" for g in gains) + " test mIoU")
    if len(rows) > 1:
        values = [s["miou"] for _, s, _ in rows]
        print(f"  spread between runs (max - min): {max(values) - min(values):.4f}; worst run "
              f"minus recipe: {min(gains):+.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
