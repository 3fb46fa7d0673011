"""Benchmark: the training step against the device's FLOP limit, by layout, and what the data
pipeline costs.

1. The device's limits: the best of several large matrix products in float32 and, where
   `train` computes in bf16 (segcore.device.precision_for), in bf16, timed in this run.
2. For the model shapes of the shipped spaces (the CPU recipe, the quick space's corners), the
   training step (model + loss + optimizer) on ready-made tensors, in the plain (NCHW) and the
   channels_last layout, in float32 and (where used) bf16 autocast: patches/s, and achieved
   FLOP/s as a share of the limit of its precision (the model's forward + backward FLOP per
   patch counted by torch's FlopCounterMode). What `train` uses on this device is marked.
3. The full step `train` runs for the CPU recipe: batchgenerators loader + augmentation
   (strength 0, 0.5, 1; in-process or in worker processes) + the step, against (2).

    python bench/train.py [--steps 20] [--repeats 3] [--device cpu|cuda] [--processes 0 2 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segcore.config import TrialConfig
from segcore.device import autocast_for, computing_in, memory_format_for, precision_for
from segcore.model import build_model
from segcore.patches import train_batches
from segcore.synthetic import synthetic_dataset
from segcore.train import make_optimizer, seg_loss

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "cpu-shapes.json"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_rate(cfg, device, batches, steps: int, repeats: int, layout=None) -> float:
    """Median patches per second of full training steps fed by `batches` (an iterator), in
    `layout` (default: what `train` uses on this device)."""
    torch.manual_seed(0)
    layout = layout or memory_format_for(device)
    model = build_model(cfg.arch, 1, 3, cfg.depth, cfg.base_width, cfg.max_width)
    model = model.to(device, memory_format=layout)
    optimizer = make_optimizer(cfg, model.parameters())

    def one_step():
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        x = x.contiguous(memory_format=layout)
        with autocast_for(device):
            loss = seg_loss(model(x), y, cfg.loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        one_step()
    rates = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            one_step()
        sync(device)
        rates.append(steps * cfg.batch_size / (time.perf_counter() - start))
    return statistics.median(rates)


def ready_made(cfg, device):
    """The ceiling's input: the same batch, already in memory, forever."""
    x = torch.randn(cfg.batch_size, 1, cfg.patch_size, cfg.patch_size)
    y = torch.randint(0, 3, (cfg.batch_size, cfg.patch_size, cfg.patch_size))
    while True:
        yield x, y


def flops_per_patch(cfg) -> float:
    """Forward + backward FLOPs of one patch, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(cfg.arch, 1, 3, cfg.depth, cfg.base_width, cfg.max_width)
    x = torch.randn(2, 1, cfg.patch_size, cfg.patch_size)
    y = torch.randint(0, 3, (2, cfg.patch_size, cfg.patch_size))
    with FlopCounterMode(display=False) as counter:
        seg_loss(model(x), y, cfg.loss).backward()
    return counter.get_total_flops() / 2


def matmul_flops(device, dtype, sizes=(1024, 2048, 3072), repeats: int = 5) -> tuple[float, int]:
    """(FLOP/s, n): the best of n x n matrix products in `dtype` on this device, the practical
    limit a convolution network's training step in that precision is measured against."""
    best = (0.0, 0)
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            a @ b
            sync(device)
            best = max(best, (2 * n**3 / (time.perf_counter() - start), n))
    return best


SHAPES = {  # name: config fields over the CPU recipe's (configs/cpu-shapes.json)
    "CPU recipe (d4 w16, b16 p64)": {},
    "quick: d4 w16, b8 p64": {"batch_size": 8},
    "quick: d3 w8, b8 p48": {"depth": 3, "base_width": 8, "batch_size": 8, "patch_size": 48},
    "quick: d2 w8, b8 p32": {"depth": 2, "base_width": 8, "batch_size": 8, "patch_size": 32},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--processes", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    device = torch.device(args.device)
    recipe = TrialConfig.load(RECIPE)
    used, precision = memory_format_for(device), precision_for(device)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    precisions = ["fp32", "bf16"] if precision == "bf16" else ["fp32"]
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, train computes in "
          f"{precision}; median of {args.repeats} x {args.steps} steps")  # fmt: skip
    peaks = {}
    for p in precisions:
        peaks[p], n = matmul_flops(device, dtypes[p])
        print(f"  the {p} limit: {peaks[p] / 1e9:.1f} GFLOP/s, the best {p} {n}^2 matrix product")
    print(f"\n  {'model, on ready-made tensors':<32}{'layout, precision':<24}{'patches/s':>10}"
          f"{'GFLOP/s':>9}{'of limit':>9}")  # fmt: skip
    ceiling = None
    for name, fields in SHAPES.items():
        cfg = TrialConfig.from_dict({**recipe.to_dict(), **fields})
        flops = flops_per_patch(cfg)
        for layout, label in ((torch.contiguous_format, "NCHW"),
                              (torch.channels_last, "channels_last")):  # fmt: skip
            for p in precisions:
                with computing_in(p):
                    rate = step_rate(cfg, device, ready_made(cfg, device), args.steps,
                                     args.repeats, layout)  # fmt: skip
                mark = " (train)" if (layout, p) == (used, precision) else ""
                print(f"  {name:<32}{f'{label}, {p}{mark}':<24}{rate:>10.1f}"
                      f"{flops * rate / 1e9:>9.1f}{flops * rate / peaks[p]:>9.0%}")  # fmt: skip
                if not fields and mark:
                    ceiling = rate
    data = synthetic_dataset(40, seed=3)
    print(f"\n  {'CPU recipe, full step: input pipeline':<48}{'patches/s':>10}{'of step':>9}")
    for strength in (0.0, 0.5, 1.0):
        for processes in args.processes:
            stream = train_batches(
                data.images, data.masks, patch_size=recipe.patch_size,
                batch_size=recipe.batch_size, aug_strength=strength,
                fg_fraction=recipe.fg_fraction, seed=0, processes=processes,
                pin_memory=device.type == "cuda",
            )  # fmt: skip
            try:
                rate = step_rate(recipe, device, stream, args.steps, args.repeats)
            finally:
                stream.close()
            label = f"strength {strength}, {processes} augmentation processes"
            print(f"  {label:<48}{rate:>10.1f}{rate / ceiling:>9.0%}")


if __name__ == "__main__":
    main()
