"""Benchmark: Optuna storage cost per trial (ask, a report per epoch, tell) with parallel workers.

Each worker process runs trials that do no training, only the storage traffic of a real trial
(the slot lock around the ask, suggestions, user attributes, one report and prune check per
epoch, tell), on SQLite in WAL mode
with the busy timeout we use, on a JournalStorage file, and on PostgreSQL when --postgres URL is
given. Prints median milliseconds of storage time per trial and that time as a share of a trial of
the CPU recipe, whose epoch time is measured in this same run.

    python bench/storage.py [--workers 1 4 16] [--trials 10] [--epochs 12] [--postgres URL]
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def storage_for(kind: str, where: str):
    import optuna

    if kind == "journal":
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(where))
    from segsearch.storage import open_storage

    return open_storage(where)


def worker(kind: str, where: str, trials: int, epochs: int, out) -> None:
    import warnings

    import optuna

    warnings.filterwarnings("ignore")  # heartbeat outside optimize(), experimental features

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = storage_for(kind, where)
    study = optuna.load_study(study_name="bench", storage=storage)
    lock = None
    if kind != "journal":  # the workers' lock around the ask, as in a search
        from segsearch.storage import SlotLock

        lock = SlotLock(storage, where, "bench")
    times = []
    for _ in range(trials):
        start = time.perf_counter()
        with lock.held() if lock else contextlib.nullcontext():
            trial = study.ask()
        trial.suggest_categorical("patch_size", [32, 48, 64])
        trial.suggest_float("lr", 1e-3, 0.2, log=True)
        trial.set_user_attr("config", {"depth": 4, "lr": 0.1})
        for epoch in range(epochs):
            trial.report(0.5 + epoch / 100, epoch)
            trial.should_prune()
        study.tell(trial, 0.9)
        times.append(time.perf_counter() - start)
    out.put(times)


def run(kind: str, where: str, workers: int, trials: int, epochs: int) -> float:
    import warnings

    import optuna

    warnings.filterwarnings("ignore")

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.create_study(study_name="bench", storage=storage_for(kind, where), load_if_exists=True)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(kind, where, trials, epochs, out))
             for _ in range(workers)]  # fmt: skip
    for p in procs:
        p.start()
    times = [t for _ in procs for t in out.get()]
    for p in procs:
        p.join()
    return statistics.median(times)


def recipe_epoch_seconds() -> float:
    """Seconds of one epoch of the CPU recipe (first 10 steps, scaled), measured here."""
    import torch

    from segcore.config import TrialConfig
    from segcore.model import build_model
    from segcore.train import make_optimizer, seg_loss

    cfg = TrialConfig.load(Path(__file__).resolve().parents[1] / "configs" / "cpu-shapes.json")
    model = build_model(cfg.arch, 1, 3, cfg.depth, cfg.base_width, cfg.max_width)
    opt = make_optimizer(cfg, model.parameters())
    x = torch.randn(cfg.batch_size, 1, cfg.patch_size, cfg.patch_size)
    y = torch.randint(0, 3, (cfg.batch_size, cfg.patch_size, cfg.patch_size))
    start = time.perf_counter()
    for _ in range(10):
        loss = seg_loss(model(x), y, cfg.loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / 10 * cfg.steps_per_epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--trials", type=int, default=10, help="trials per worker")
    parser.add_argument("--epochs", type=int, default=12, help="reports per trial")
    parser.add_argument("--postgres", help="postgresql+psycopg://... to include PostgreSQL")
    args = parser.parse_args()
    epoch_s = recipe_epoch_seconds()
    print(f"{args.trials} trials per worker, {args.epochs} reports each; CPU recipe epoch "
          f"measured here: {epoch_s:.1f} s, so a {args.epochs}-epoch trial takes "
          f"{epoch_s * args.epochs:.0f} s")  # fmt: skip
    print(f"\n  {'storage':<22}{'workers':>8}{'ms/trial':>10}{'share of a trial':>18}")
    with tempfile.TemporaryDirectory() as tmp:
        kinds = [("sqlite (WAL)", "sqlite", lambda n: f"sqlite:///{tmp}/s{n}.db"),
                 ("journal file", "journal", lambda n: f"{tmp}/j{n}.log")]  # fmt: skip
        if args.postgres:
            kinds.append(("postgresql", "rdb", lambda n: args.postgres))
        for label, kind, where in kinds:
            for n in args.workers:
                t = run("journal" if kind == "journal" else "rdb", where(n), n, args.trials,
                        args.epochs)  # fmt: skip
                share = t / (epoch_s * args.epochs)
                print(f"  {label:<22}{n:>8}{t * 1000:>10.1f}{share:>17.3%}")


if __name__ == "__main__":
    main()
