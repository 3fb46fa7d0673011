"""Benchmark: search efficiency. Pruners against no pruning on the same budget, and the time to
reach a target full-image mIoU with TPE against random sampling, over a few seeds.

Every study runs the product's own path (create_study, the worker launcher, stitched rescoring)
on the quick space's data (synthetic, seed 0, or --data), in a temporary folder, without the
warm-start trial (a warm start that wins would decide "the same winner" by itself). Part 1 runs,
for each seed, the space's pruner, any --pruner given, and `pruner: none`, and compares the
epochs trained and the winner's test mIoU: the winner (best validation full-image mIoU of the
rescored top K) is trained once more (`--final-budget trial`: with its trial's own settings;
`space`: with the space's final: section) on the study's split and scored on its test images;
the same winning config is fitted once. Part 2 runs TPE and random sampling, rescoring every
completed trial, so that the moment each sampler first finished a trial at a target is known
(TPE's first trials try every categorical choice once, segsearch.study.coverage_params: part of
what TPE is measured with).
Part 3 (--precisions fp32 bf16) runs the space as it is (warm start and pruner included), on the
first seed, once in each precision (TRAIN_OPTUNA_PRECISION), and prints trials and epochs per hour.
Wall times are only comparable within one run.

    python bench/search.py [--space search_spaces/quick.yaml] [--n-trials 24] [--seeds 0 1 2]
                           [--pruner '{name: median, args: {...}}' ...] [--final-budget trial]
                           [--targets 0.95 0.96 0.97] [--workers 2] [--skip-pruning]
                           [--skip-space-pruner] [--skip-samplers] [--precisions fp32 bf16]
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


def run_study(raw: dict, name: str, n_trials: int, workers: int, seed: int, rescore_all: bool,
              data: str | None = None):  # fmt: skip
    """One search to its budget; returns its figures."""
    import optuna

    from segsearch.launcher import Launcher, parse_gpus
    from segsearch.rescore import score
    from segsearch.space import parse_space
    from segsearch.storage import open_storage, storage_url
    from segsearch.study import create_study

    # storage/ and reports/ are relative to the working folder, as for a user
    if rescore_all:  # keep every completed trial's checkpoint, not only the running top K, so
        # that a trial that reached a target and later dropped out of the top K still counts
        raw = {**raw, "study": {**raw["study"], "top_k": n_trials + 1}}
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        Path("storage").mkdir()
        url = storage_url(name, None)
        space = parse_space(raw, f"{name}.yaml")
        create_study(name, url, space, data, n_trials)
        started = time.perf_counter()
        Launcher(name, url, workers, parse_gpus("all"), quiet=True, seed=seed).run()
        wall = time.perf_counter() - started
        study = optuna.load_study(study_name=name, storage=open_storage(url))
        trials = study.get_trials(deepcopy=False)
        done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        top_k = len(done) if rescore_all else space.top_k
        scores = score(name, url, top_k=top_k, progress=False, panels=False)
    winner = max(scores, key=lambda n: (scores[n]["miou"], -int(n)))
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
        "winner": trials[int(winner)].user_attrs["config"],
    }


def test_miou(config: dict, raw: dict, data: str | None, budget: str, cache: dict) -> float:
    """Test mIoU of `config` trained on its study's split (the final fit's path), once per
    config: two searches that pick the same winner hand over the same model."""
    from segcore.config import TrialConfig
    from segcore.device import pick_device
    from segcore.fit import fit
    from segsearch.space import final_config, parse_space
    from segsearch.study import load_splits

    space = parse_space(raw, "bench")
    cfg = TrialConfig.from_dict(config)
    cfg = final_config(cfg, space) if budget == "space" else cfg
    key = repr(sorted(cfg.to_dict().items()))
    if key not in cache:
        with tempfile.TemporaryDirectory() as tmp:
            done = fit(cfg, load_splits(data, None, space), Path(tmp) / "m.pt", sources={},
                       device=pick_device(), progress=False)  # fmt: skip
        cache[key] = done["test"]["miou"]
    return cache[key]


def time_to(target: float, full_at: dict) -> float:
    """Seconds from the study's first trial until a trial at the target had finished."""
    times = [t for t, miou in full_at.values() if miou >= target]
    return min(times) if times else float("inf")


def pruning(raw: dict, args) -> None:
    variants = {}
    if not args.skip_space_pruner:
        variants[f"{raw['study']['pruner']['name']} (the space's)"] = raw["study"]["pruner"]
    for spec in args.pruner:
        variants[f"{spec['name']} {spec.get('args', {})}"] = spec
    variants["none"] = {"name": "none"}
    base = {k: v for k, v in raw["study"].items() if k != "warm_start"}
    runs: dict[str, list[dict]] = {label: [] for label in variants}
    fitted: dict = {}
    for seed in args.seeds:
        for label, pruner in variants.items():
            variant = {**raw, "study": {**base, "pruner": pruner, "warm_start": False}}
            r = run_study(variant, "prune", args.n_trials, args.workers, seed, False, args.data)
            r["test"] = test_miou(r["winner"], raw, args.data, args.final_budget, fitted)
            runs[label].append(r)
            print(f"  finished {label}, seed {seed}: {r['wall']:.0f} s, {r['epochs']} epochs, "
                  f"winner's test mIoU {r['test']:.4f}", file=sys.stderr)  # fmt: skip
    none = runs["none"]
    print(f"\nPruning, {args.n_trials} trials, {args.workers} workers, sampler "
          f"{raw['study']['sampler']['name']}, no warm start, seeds "
          f"{' '.join(map(str, args.seeds))}; winner's test mIoU after a fit at the "
          f"{args.final_budget} budget")  # fmt: skip
    print(f"  {'pruner':<44}{'seed':>5}{'complete/pruned':>16}{'epochs':>7}{'of none':>8}"
          f"{'wall s':>7}{'test mIoU':>10}{'- none':>8}")  # fmt: skip
    for label, rs in runs.items():
        for seed, r, n in zip(args.seeds, rs, none):
            st = r["states"]
            print(f"  {label:<44}{seed:>5}{st['COMPLETE']:>9}/{st['PRUNED']:<6}{r['epochs']:>7}"
                  f"{r['epochs'] / n['epochs']:>7.2f}x{r['wall']:>7.0f}{r['test']:>10.4f}"
                  f"{r['test'] - n['test']:>+8.4f}")  # fmt: skip
        ratio = statistics.median(r["epochs"] / n["epochs"] for r, n in zip(rs, none))
        gap = statistics.median(r["test"] - n["test"] for r, n in zip(rs, none))
        print(f"  {label:<44} median: {ratio:.2f}x the epochs of no pruner, winner's test mIoU "
              f"{gap:+.4f} against no pruner")  # fmt: skip


def samplers(raw: dict, args) -> None:
    results: dict[str, list[dict]] = {"tpe": [], "random": []}
    base = {k: v for k, v in raw["study"].items() if k != "warm_start"}
    for seed in args.seeds:
        for name, runs in results.items():
            sampler = raw["study"]["sampler"] if name == "tpe" else {"name": "random"}
            variant = {**raw, "study": {**base, "sampler": sampler, "warm_start": False}}
            r = run_study(variant, f"{name}{seed}", args.n_trials, args.workers, seed, True,
                          args.data)  # fmt: skip
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


def precisions(raw: dict, args) -> None:
    from segcore.device import computing_in

    print(f"\nTrials per hour by precision: the space as it is, {args.n_trials} trials, "
          f"{args.workers} workers, seed {args.seeds[0]}")  # fmt: skip
    for precision in args.precisions:
        with computing_in(precision):
            r = run_study(raw, f"tph-{precision}", args.n_trials, args.workers, args.seeds[0],
                          False, args.data)  # fmt: skip
        st = r["states"]
        print(f"  {precision:<6}{st['COMPLETE']:>3} complete, {st['PRUNED']:>2} pruned, "
              f"{r['epochs']:>4} epochs in {r['wall']:>4.0f} s: "
              f"{(st['COMPLETE'] + st['PRUNED']) * 3600 / r['wall']:>4.0f} trials/h, "
              f"{r['epochs'] * 3600 / r['wall']:>5.0f} epochs/h")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default=str(ROOT / "search_spaces" / "quick.yaml"))
    parser.add_argument("--n-trials", type=int, default=24)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.95, 0.96, 0.97])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--pruner", type=yaml.safe_load, action="append", default=[],
                        help="another pruner to compare, in the space file's form")  # fmt: skip
    parser.add_argument("--final-budget", choices=("trial", "space"), default="trial")
    parser.add_argument("--data", help="labelled data folder (default: synthetic, seed 0)")
    parser.add_argument("--skip-pruning", action="store_true")
    parser.add_argument("--skip-space-pruner", action="store_true",
                        help="compare only the --pruner variants with none")  # fmt: skip
    parser.add_argument("--skip-samplers", action="store_true")
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"), default=[],
                        help="part 3: trials per hour in each precision")  # fmt: skip
    args = parser.parse_args()
    args.data = str(Path(args.data).resolve()) if args.data else None  # studies run elsewhere
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
    if args.precisions:
        precisions(raw, args)


if __name__ == "__main__":
    main()
