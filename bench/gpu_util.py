"""Benchmark: how busy a search keeps the GPU, by workers per GPU (issue 24, item 5).

For each data folder and each --workers-per-gpu value, runs `search --space default.yaml` for a
fixed wall time (`--timeout`: running trials stop at an epoch's end) while sampling the GPUs'
utilisation with `nvidia-smi`, then reads the study: epochs trained, trials finished, and the
device, precision and threads each worker recorded. Prints one row per run:

    python bench/gpu_util.py --data ../shared/datasets/shapes [--data DIR ...]
                             [--workers-per-gpu 1 2 4] [--seconds 60] [--out runs/gpu_util]

Utilisation is the mean of the samples taken after the first epoch of any trial was reported
(start-up: forking workers, reading data, CUDA context), so it measures the search's steady
state. Trials per hour at a full default.yaml trial (40 epochs) are epochs per hour / 40: a
one-minute run finishes few trials, and pruning only shortens them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def sample_utilisation(proc: subprocess.Popen, samples: list[tuple[float, float]]) -> None:
    """Append (time, mean utilisation over GPUs in %) every half second while `proc` runs."""
    smi = subprocess.Popen(
        ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "500"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    row: list[float] = []
    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=True)
    gpus = listed.stdout.count("GPU ")
    assert smi.stdout is not None
    for line in smi.stdout:
        if proc.poll() is not None:
            break
        row.append(float(line.strip()))
        if len(row) == max(gpus, 1):
            samples.append((time.time(), statistics.fmean(row)))
            row = []
    smi.terminate()


def one_run(data: Path, per_gpu: int, seconds: int, out: Path, gpus: str, space: Path) -> dict:
    import optuna

    name = f"util-{data.name}-w{per_gpu}"
    storage = f"sqlite:///{out}/{name}.db"
    log = out / f"{name}.log"
    cmd = [sys.executable, str(ROOT / "train_optuna.py"), "search", "--space",
           str(space), "--study", name, "--storage", storage,
           "--data", str(data), "--gpus", gpus, "--workers-per-gpu", str(per_gpu),
           "--timeout", str(seconds), "--no-rescore", "--no-final", "--quiet"]  # fmt: skip
    samples: list[tuple[float, float]] = []
    started = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=out, stdout=f, stderr=subprocess.STDOUT)
        sampler = threading.Thread(target=sample_utilisation, args=(proc, samples), daemon=True)
        sampler.start()
        proc.wait()
        sampler.join(timeout=5)
    wall = time.time() - started
    if proc.returncode:
        sys.exit(f"error: search failed ({proc.returncode}); see {log}")
    trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    epochs = sum(len(t.intermediate_values) for t in trials)
    # Steady state: from the first reported epoch's time on (a trial's datetime_start plus its
    # first epoch's seconds is not recorded, so the earliest trial start plus one epoch's median).
    per_epoch = [t.user_attrs.get("seconds_per_epoch") for t in trials]
    first_epoch = min(
        (t.datetime_start.timestamp() for t in trials if t.datetime_start), default=started
    )
    first_epoch += statistics.median([s for s in per_epoch if s] or [0.0])
    steady = [u for at, u in samples if at >= first_epoch] or [u for _, u in samples]
    ran = [t.user_attrs for t in trials if "device" in t.user_attrs]
    return {
        "data": data.name,
        "workers_per_gpu": per_gpu,
        "wall_s": round(wall, 1),
        "gpu_util_mean": round(statistics.fmean(steady), 1) if steady else None,
        "gpu_util_median": round(statistics.median(steady), 1) if steady else None,
        "samples": len(steady),
        "epochs": epochs,
        "epochs_per_hour": round(epochs * 3600 / wall),
        "trials_finished": sum(t.state.is_finished() for t in trials),
        "trial_equivalents_per_hour": round(epochs * 3600 / wall / 40, 1),
        "workers": sorted({(a["device"], a.get("precision"), a.get("threads")) for a in ran}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, action="append", required=True)
    parser.add_argument("--workers-per-gpu", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seconds", type=int, default=60, help="each search's --timeout")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_util")
    parser.add_argument("--gpus", default="all", help="search's --gpus")
    parser.add_argument("--space", type=Path, default=ROOT / "search_spaces" / "default.yaml")
    args = parser.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    print("data       w/GPU  wall s  util mean  util median  epochs/h  trials/h@40ep  finished")
    rows = []
    for data in args.data:
        for per_gpu in args.workers_per_gpu:
            row = one_run(
                data.resolve(), per_gpu, args.seconds, args.out, args.gpus, args.space.resolve()
            )
            rows.append(row)
            print(f"{row['data']:<10} {per_gpu:>5}  {row['wall_s']:>6}  {row['gpu_util_mean']!s:>9}  "
                  f"{row['gpu_util_median']!s:>11}  {row['epochs_per_hour']:>8}  "
                  f"{row['trial_equivalents_per_hour']:>13}  {row['trials_finished']:>8}  "
                  f"{row['workers']}", flush=True)  # fmt: skip
    (args.out / "gpu_util.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
