"""The one device choice, and how models and tensors are laid out and cast on that device."""

from __future__ import annotations

import functools
import math
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from segcore.errors import UserError


def pick_device(name: str | None = None) -> torch.device:
    """CUDA when present, else the CPU; `name` ('auto', 'cpu', 'cuda', 'cuda:N') overrides.
    Every path that runs a model (train, rescoring, final fit, evaluate, predict) takes it here,
    and a bad TRAIN_OPTUNA_PRECISION is an error here, before anything runs."""
    if name in (None, "", "auto"):
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        precision_for(device)
        return device
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r}: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"--device {name}: no CUDA device is visible on this machine")
        if (device.index or 0) >= count:
            raise UserError(f"--device {name}: this machine has {count} CUDA device(s)")
    precision_for(device)
    return device


def usable_cpus(cgroup_root: Path = Path("/sys/fs/cgroup"), proc: Path = Path("/proc/self")) -> int:
    """The CPUs this process may use, not the machine's: the smallest of its affinity mask
    (taskset, a SLURM task's binding, a container's cpuset), its cgroup's CPU quota (v2 cpu.max
    or v1 cpu.cfs_quota_us, rounded up) and SLURM_CPUS_PER_TASK; at least 1. What the launcher
    divides between its workers, and what a worker started by hand or by a SLURM array uses."""
    counts = [len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0]
    counts[0] = counts[0] or os.cpu_count() or 1
    quota = cgroup_quota(cgroup_root, proc)
    if quota:
        counts.append(quota)
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        counts.append(int(slurm))
    return max(1, min(counts))


def cgroup_quota(root: Path, proc: Path) -> int | None:
    """CPUs of this process's cgroup quota (the tightest along its path), or None when there is
    no quota or no cgroup file system."""
    found = []
    try:
        lines = (proc / "cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: quota / period in cpu.max, "max" when none
            files = [(d / "cpu.max", None) for d in _up(root / path.lstrip("/"), root)]
        elif "cpu" in controllers.split(","):  # v1: two files
            base = root / "cpu"
            files = [(d / "cpu.cfs_quota_us", d / "cpu.cfs_period_us")
                     for d in _up(base / path.lstrip("/"), base)]  # fmt: skip
        else:
            continue
        for quota_file, period_file in files:
            try:
                if period_file is None:
                    quota, period = quota_file.read_text().split()
                else:
                    quota, period = quota_file.read_text(), period_file.read_text()
                if quota.strip() not in ("max", "-1"):
                    found.append(math.ceil(int(quota) / int(period)))
            except (OSError, ValueError):
                continue
    return min(found) if found else None


def _up(folder: Path, root: Path) -> list[Path]:
    """`folder` and its parents up to `root`."""
    out = [folder]
    while folder != root and root in folder.parents:
        folder = folder.parent
        out.append(folder)
    return out


PRECISION_ENV = "TRAIN_OPTUNA_PRECISION"  # auto (the default), bf16, fp16 (CUDA only) or fp32
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


@functools.cache  # asked on every training step and tile batch; the CPU does not change
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX); without it bf16 autocast is
    emulated and 4-14x slower than float32 (measured on AVX2 cores, docs/benchmarks.md)."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def precision_for(device: torch.device) -> str:
    """'bf16', 'fp16' or 'fp32': the precision every model runs in on `device`, training and
    inference alike (PyTorch AMP's rule). On CUDA, bf16 autocast where the GPU computes it
    (compute capability 8.0 and up: A100, H100, L4, RTX 30xx and later), fp16 autocast with a
    gradient scaler where it does not (V100, T4: bf16 there is emulated or fails); on the CPU,
    bf16 where the cores compute it natively, where it measured 1.7-2.0x float32 for training and
    inference with the same test mIoU (docs/benchmarks.md), else float32.
    TRAIN_OPTUNA_PRECISION=bf16|fp16|fp32 overrides it (fp16 only on CUDA; `train --config
    best.json` sets it to best.pt's, so a retraining computes as the original did)."""
    wanted = os.environ.get(PRECISION_ENV, "auto")
    if wanted not in PRECISIONS:
        raise UserError(f"{PRECISION_ENV}={wanted!r}: use auto, bf16, fp16 or fp32")
    if wanted == "fp16" and device.type != "cuda":
        raise UserError(f"{PRECISION_ENV}=fp16: only on a CUDA device (the CPU computes bf16 or "
                        f"fp32)")  # fmt: skip
    if wanted != "auto":
        return wanted
    if device.type == "cuda":
        return "bf16" if gpu_has_bf16(device) else "fp16"
    return "bf16" if cpu_has_bf16() else "fp32"


def gpu_has_bf16(device: torch.device) -> bool:
    """Whether the GPU computes bf16 natively (compute capability 8.0 or later)."""
    return torch.cuda.get_device_capability(device)[0] >= 8


@contextmanager
def computing_in(precision: str):
    """Models compute in `precision` ('bf16' or 'fp32') inside the block, in this process and in
    the worker processes it starts (they inherit the variable); as before after it."""
    before = os.environ.get(PRECISION_ENV)
    os.environ[PRECISION_ENV] = precision
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(PRECISION_ENV, None)
        else:
            os.environ[PRECISION_ENV] = before


def autocast_for(device: torch.device):
    """bf16 or fp16 autocast where precision_for says so; nothing (float32) otherwise."""
    precision = precision_for(device)
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(
        device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16
    )


def grad_scaler(device: torch.device):
    """The gradient scaler fp16 training needs (small gradients underflow in fp16); one that
    does nothing for bf16 and float32."""
    return torch.amp.GradScaler(device.type, enabled=precision_for(device) == "fp16")


def memory_format_for(device: torch.device) -> torch.memory_format:
    """The memory layout of a model and its inputs on `device`, for training and inference alike:
    channels_last everywhere. On CUDA it lets cuDNN pick its fastest kernels; on this project's
    CPU machine it measured faster too (docs/benchmarks.md: bench/infer.py 1.15-1.29x for stitched
    inference, bench/train.py 1.14x for the CPU recipe's training step, level for the smallest
    quick-space models)."""
    return torch.channels_last


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A (B, C, H, W) batch on `device`, in the layout the model uses there."""
    return x.to(device, non_blocking=True).contiguous(memory_format=memory_format_for(device))
