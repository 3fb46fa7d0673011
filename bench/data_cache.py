"""Benchmark: a worker's memory and loading time with and without the decode cache.

Writes a data set of about 1 GB decoded (default 85 uint16 2048 x 2048 zlib TIFFs with 3-class
PNG masks), then, several times for each mode, starts 4 worker processes together (fresh
interpreters, as spawned workers are) that each load it the way a search worker does
(`segcore.data.dataset_from`, the function `study_splits` calls) and read every pixel once, as
the epochs of a search end up doing. With all 4 alive, their resident (RSS), proportional (PSS:
shared pages split between the processes that map them) and unique (USS) memory are read from
/proc/PID/smaps_rollup. Modes: `decode` (no cache: each worker decodes every file into its own
memory) and `cache` (the study's cache, filled once before the workers start, as `search` does:
each worker maps the same .npy files read-only). Prints medians over the repeats and the ratios.

    python bench/data_cache.py [--out runs/data-cache] [--images 85] [--size 2048]
                               [--workers 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MIB = 2**20


def write_data(folder: Path, n: int, size: int) -> None:
    """n uint16 images (blobs on a background with noise, like fluorescence) and their masks."""
    import tifffile
    from PIL import Image

    if (folder / "labels.json").exists():
        return
    rng = np.random.default_rng(0)
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        mask = np.zeros((size, size), np.uint8)
        for _ in range(60):
            cy, cx, r = rng.integers(0, size), rng.integers(0, size), rng.integers(10, 60)
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            mask[inside] = 1
            mask[inside & ((yy - cy) ** 2 + (xx - cx) ** 2 > (r - 3) ** 2)] = 2
        image = 1000 + 3000 * (mask > 0) + rng.normal(0, 200, mask.shape)
        tifffile.imwrite(folder / "images" / f"im_{i:03d}.tif", image.astype(np.uint16),
                         compression="zlib")  # fmt: skip
        Image.fromarray(mask).save(folder / "masks" / f"im_{i:03d}.png")
    labels = {"classes": ["background", "inside", "rim"], "values": [0, 1, 2]}
    (folder / "labels.json").write_text(json.dumps(labels))


def memory(pid: int) -> dict[str, float]:
    """RSS, PSS and USS of a process in MiB (smaps_rollup)."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0]) * 1024
    uss = fields["Private_Clean"] + fields["Private_Dirty"]
    return {"rss": fields["Rss"] / MIB, "pss": fields["Pss"] / MIB, "uss": uss / MIB}


def worker(folder: str, cache: str | None, ready, go) -> None:
    import torch  # what a worker holds anyway, so its share is in both modes

    from segcore.data import dataset_from

    torch.set_num_threads(1)
    started = time.perf_counter()
    data = dataset_from(folder, None, cache)
    loaded = time.perf_counter() - started
    total = sum(float(np.asarray(a, np.float64).sum()) for a in data.raw)  # every pixel once
    total += sum(int(np.asarray(m).sum()) for m in data.masks)
    ready.put((loaded, total))
    go.wait()


def run(folder: Path, cache: Path | None, workers: int) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    ready, go = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=worker, args=(str(folder), cache and str(cache), ready, go))
             for _ in range(workers)]  # fmt: skip
    for p in procs:
        p.start()
    got = [ready.get(timeout=1800) for _ in procs]
    mems = [memory(p.pid) for p in procs]
    go.set()
    for p in procs:
        p.join()
    assert len({t for _, t in got}) == 1, "the workers read different data"
    out = {k: sum(m[k] for m in mems) / workers for k in ("rss", "pss", "uss")}
    out["load_s"] = statistics.median(s for s, _ in got)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "runs" / "data-cache"))
    parser.add_argument("--images", type=int, default=85)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    out = Path(args.out).resolve()
    folder, cache = out / "data", out / "cache"
    write_data(folder, args.images, args.size)
    decoded = args.images * args.size**2 * 3 / MIB  # uint16 image + uint8 mask
    print(f"data: {args.images} images of {args.size}x{args.size} uint16 (zlib TIFF) + uint8 "
          f"masks = {decoded:.0f} MiB decoded; {args.workers} workers, medians of "
          f"{args.repeats} runs (per worker: memory with every pixel read once, MiB)")  # fmt: skip
    rows: dict[str, list[dict]] = {"decode": [], "cache": []}
    fill = []
    for _ in range(args.repeats):
        rows["decode"].append(run(folder, None, args.workers))
        shutil.rmtree(cache, ignore_errors=True)
        started = time.perf_counter()  # what `search` does once, before its workers start
        from segcore.data import dataset_from

        dataset_from(folder, None, cache)
        fill.append(time.perf_counter() - started)
        rows["cache"].append(run(folder, cache, args.workers))
    med = {mode: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
           for mode, rs in rows.items()}  # fmt: skip
    print(f"  {'mode':<34}{'load s':>8}{'RSS':>8}{'PSS':>8}{'USS':>8}")
    names = {"decode": "no cache: each worker decodes", "cache": "cache: workers map the .npy"}
    for mode, m in med.items():
        print(f"  {names[mode]:<34}{m['load_s']:>8.2f}{m['rss']:>8.0f}{m['pss']:>8.0f}"
              f"{m['uss']:>8.0f}")  # fmt: skip
    print(f"  filling the cache once (search, before the workers): {statistics.median(fill):.1f} s")
    d, c = med["decode"], med["cache"]
    print(f"  cache / no cache per worker: load time {c['load_s'] / d['load_s']:.3f}x, "
          f"PSS {c['pss'] / d['pss']:.2f}x, USS {c['uss'] / d['uss']:.3f}x; all "
          f"{args.workers} workers: {d['pss'] * args.workers:.0f} MiB against "
          f"{c['pss'] * args.workers:.0f} MiB (PSS)")  # fmt: skip


if __name__ == "__main__":
    main()
