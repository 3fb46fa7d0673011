"""The one device choice, and how models and tensors are laid out and cast on that device."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from segcore.errors import UserError


def pick_device(name: str | None = None) -> torch.device:
    """CUDA when present, else the CPU; `name` ('auto', 'cpu', 'cuda', 'cuda:N') overrides.
    Every path that runs a model (train, rescoring, final fit, evaluate, predict) takes it here."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
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
    return device


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA; nothing on the CPU, where bf16 is slower for these convolutions."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def memory_format_for(device: torch.device) -> torch.memory_format:
    """The memory layout of a model and its inputs on `device`, for training and inference alike:
    channels_last everywhere. On CUDA it lets cuDNN pick its fastest kernels; on this project's
    CPU machine it measured faster too (docs/benchmarks.md: bench/infer.py 1.15-1.29x for stitched
    inference, bench/train.py 1.14x for the CPU recipe's training step, level for the smallest
    quick-space models). bf16 stays CUDA-only (segcore.device.autocast_for): the machine here has
    no bf16 instructions (AVX2), where bf16 autocast made a training step 4-14 times slower."""
    return torch.channels_last


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A (B, C, H, W) batch on `device`, in the layout the model uses there."""
    return x.to(device, non_blocking=True).contiguous(memory_format=memory_format_for(device))
