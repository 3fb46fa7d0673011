"""Benchmark: patches per second of our full training step against the model alone.

The full step is what `train` runs: batchgenerators loader + augmentation (strength 0, 0.5, 1;
in-process or in worker processes) + model + loss + optimizer. The ceiling is the same model and
optimizer on ready-made tensors; the ratio is what the data pipeline costs. Also the model's FLOPs
per patch and the achieved FLOP/s against a large matrix product timed on this machine.

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
from segcore.device import autocast_for
from segcore.model import build_model
from segcore.patches import train_batches
from segcore.synthetic import synthetic_dataset
from segcore.train import make_optimizer, seg_loss

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "cpu-shapes.json"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_rate(cfg, device, batches, steps: int, repeats: int) -> float:
    """Median patches per second of full training steps fed by `batches` (an iterator)."""
    torch.manual_seed(0)
    model = build_model(cfg.arch, 1, 3, cfg.depth, cfg.base_width, cfg.max_width).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model.parameters())

    def one_step():
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
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


def matmul_flops(device, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an n x n float32 matrix product on this device (the practical peak)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    runs = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        runs.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--processes", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    device = torch.device(args.device)
    cfg = TrialConfig.load(RECIPE)
    data = synthetic_dataset(40, seed=3)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"CPU recipe model (depth {cfg.depth}, width {cfg.base_width}), batch {cfg.batch_size} "
          f"of {cfg.patch_size}x{cfg.patch_size}; median of {args.repeats} x {args.steps} steps")  # fmt: skip
    ceiling = step_rate(cfg, device, ready_made(cfg, device), args.steps, args.repeats)
    print(f"\n  {'input pipeline':<40}{'patches/s':>11}{'of ceiling':>12}")
    print(f"  {'ready-made tensors (ceiling)':<40}{ceiling:>11.1f}{1:>11.0%}")
    for strength in (0.0, 0.5, 1.0):
        for processes in args.processes:
            stream = train_batches(
                data.images, data.masks, patch_size=cfg.patch_size, batch_size=cfg.batch_size,
                aug_strength=strength, fg_fraction=cfg.fg_fraction, seed=0, processes=processes,
                pin_memory=device.type == "cuda",
            )  # fmt: skip
            try:
                rate = step_rate(cfg, device, stream, args.steps, args.repeats)
            finally:
                stream.close()
            label = f"strength {strength}, {processes} augmentation processes"
            print(f"  {label:<40}{rate:>11.1f}{rate / ceiling:>11.0%}")
    flops = flops_per_patch(cfg)
    peak = matmul_flops(device)
    print(f"\n  model: {flops / 1e9:.3f} GFLOP per patch (forward + backward); at the ceiling "
          f"{flops * ceiling / 1e9:.1f} GFLOP/s = {flops * ceiling / peak:.0%} of a 2048^2 float32 "
          f"matmul on this device ({peak / 1e9:.1f} GFLOP/s)")  # fmt: skip


if __name__ == "__main__":
    main()
