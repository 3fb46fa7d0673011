"""Benchmark: search efficiency. Pruning against no pruning on the same budget, and the time to
reach a target full-image mIoU with TPE against random sampling, over a few seeds.

Every study runs the product's own path (create_study, the worker launcher, stitched rescoring)
on the quick space's data (synthetic, seed 0), in a temporary folder. Part 1 runs the space as it
is and with `pruner: none`; part 2 runs it without the warm-start trial (which would reach any
target in trial 0 for both) with sampler tpe and random, for each seed, rescoring every completed
trial on whole images so that the moment each sampler first finished a trial at the target is
known. Wall times are only comparable within one run.

    python bench/search.py [--space search_spaces/quick.yaml] [--n-trials 24] [--seeds 0 1 2]
                           [--targets 0.95 0.96 0.97] [--workers 2] [--skip-pruning] [--skip-samplers]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_study(raw: dict, name: str, n_trials: int, workers: int, seed: int, rescore_all: bool):
    """One search to its budget; returns its figures."""
    import optuna

    from segcore.rescore import score
    from segcore.space import parse_space
    from segcore.storage import open_storage, storage_url
    from segcore.study import create_study
    from segcore.workers import Launcher, parse_gpus

    # storage/ and reports/ are relative to the working folder, as for a user
    if rescore_all:  # keep every completed trial's checkpoint, not only the running top K, so
        # that a trial that reached a target and later dropped out of the top K still counts
        raw = {**raw, "study": {**raw["study"], "top_k": n_trials + 1}}
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        Path("storage").mkdir()
        url = storage_url(name, None)
        space = parse_space(raw, f"{name}.yaml")
        create_study(name, url, space, None, n_trials)
        started = time.perf_counter()
        Launcher(name, url, workers, parse_gpus("all"), quiet=True, seed=seed).run()
        wall = time.perf_counter() - started
        study = optuna.load_study(study_name=name, storage=open_storage(url))
        trials = study.get_trials(deepcopy=False)
        done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        top_k = len(done) if rescore_all else space.top_k
        scores = score(name, url, top_k=top_k, progress=False, panels=False)
    t0 = min(t.datetime_start for t in trials)
    finished = {str(t.number): (t.datetime_complete - t0).total_seconds() for t in done}
    return {
        "wall": wall,
        "epochs": sum(t.user_attrs.get("epochs_run", 0) for t in trials),
        "states": {
            s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL")
        },
        "best_patch": max(t.value for t in done),
        "best_full": max(s["miou"] for s in scores.values()),
        "full_at": {n: (finished[n], s["miou"]) for n, s in scores.items()},
    }


def time_to(target: float, full_at: dict) -> float:
    """Seconds from the study's first trial until a trial at the target had finished."""
    times = [t for t, miou in full_at.values() if miou >= target]
    return min(times) if times else float("inf")


def pruning(raw: dict, args) -> None:
    runs = {}
    for label, pruner in (("pruner " + raw["study"]["pruner"]["name"], raw["study"]["pruner"]),
                          ("no pruner", {"name": "none"})):  # fmt: skip
        variant = {**raw, "study": {**raw["study"], "pruner": pruner}}
        runs[label] = run_study(variant, "prune", args.n_trials, args.workers, 0, False)
        print(f"  finished {label}: {runs[label]['wall']:.0f} s", file=sys.stderr)
    ref = runs["no pruner"]
    study = raw["study"]
    print(f"\nPruning, {args.n_trials} trials, {args.workers} workers, sampler "
          f"{study['sampler']['name']}, warm start {study.get('warm_start', False)}")  # fmt: skip
    print(f"  {'':<18}{'complete/pruned':>16}{'epochs':>8}{'of none':>9}{'wall s':>8}{'of none':>9}"
          f"{'best patch':>12}{'best full':>11}")  # fmt: skip
    for label, r in runs.items():
        s = r["states"]
        print(f"  {label:<18}{s['COMPLETE']:>8}/{s['PRUNED']:<7}{r['epochs']:>8}"
              f"{r['epochs'] / ref['epochs']:>8.2f}x"
              f"{r['wall']:>8.0f}{r['wall'] / ref['wall']:>8.2f}x"
              f"{r['best_patch']:>12.4f}{r['best_full']:>11.4f}")  # fmt: skip


def samplers(raw: dict, args) -> None:
    results: dict[str, list[dict]] = {"tpe": [], "random": []}
    base = {k: v for k, v in raw["study"].items() if k != "warm_start"}
    for seed in args.seeds:
        for name, runs in results.items():
            sampler = raw["study"]["sampler"] if name == "tpe" else {"name": "random"}
            variant = {**raw, "study": {**base, "sampler": sampler, "warm_start": False}}
            r = run_study(variant, f"{name}{seed}", args.n_trials, args.workers, seed, True)
            runs.append(r)
            print(f"  finished {name} seed {seed}: {r['wall']:.0f} s, best full-image "
                  f"{r['best_full']:.4f}", file=sys.stderr)  # fmt: skip
    print(f"\nTPE against random: {args.n_trials} trials, {args.workers} workers, pruner "
          f"{raw['study']['pruner']['name']}, no warm start, seeds "
          f"{' '.join(map(str, args.seeds))} (every completed trial rescored)")  # fmt: skip
    for name, runs in results.items():
        best = statistics.median(r["best_full"] for r in runs)
        epochs = statistics.median(r["epochs"] for r in runs)
        walls = " ".join(f"{r['wall']:.0f}" for r in runs)
        print(f"  {name:<8}best full-image mIoU, median {best:.4f}; epochs trained, median "
              f"{epochs:.0f}; wall s per seed {walls}")  # fmt: skip
    print(f"  {'target':<8}{'sampler':<8}{'seconds to target, per seed':>30}{'median':>8}"
          f"{'reached':>9}")  # fmt: skip
    for target in args.targets:
        medians = {}
        for name, runs in results.items():
            times = [time_to(target, r["full_at"]) for r in runs]
            medians[name] = statistics.median(times)
            per_seed = " ".join("never" if t == float("inf") else f"{t:.0f}" for t in times)
            print(f"  {target:<8}{name:<8}{per_seed:>30}{medians[name]:>8.0f}"
                  f"{sum(t < float('inf') for t in times):>6}/{len(times):<2}")  # fmt: skip
        if all(m < float("inf") for m in medians.values()):
            ratio = medians["tpe"] / medians["random"]
            print(f"  {'':<16}TPE's median time to {target} is {ratio:.2f}x random's")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default=str(ROOT / "search_spaces" / "quick.yaml"))
    parser.add_argument("--n-trials", type=int, default=24)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.95, 0.96, 0.97])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip-pruning", action="store_true")
    parser.add_argument("--skip-samplers", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import optuna
    import torch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    raw = yaml.safe_load(Path(args.space).read_text())
    cuda = "yes" if torch.cuda.is_available() else "no"
    print(f"space {args.space}, torch {torch.__version__}, optuna {optuna.__version__}, "
          f"{os.cpu_count()} cores, CUDA {cuda}")  # fmt: skip
    if not args.skip_pruning:
        pruning(raw, args)
    if not args.skip_samplers:
        samplers(raw, args)


if __name__ == "__main__":
    main()
