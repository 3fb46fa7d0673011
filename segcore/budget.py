"""Budgets in seconds: a config's steps per epoch from its step time measured on the device.

A config with `seconds` above 0 trains its epochs for about that long wherever it runs: before
training, a few steps of the config's own model on its own batches (patches, batch size,
augmentation, precision, threads) are timed, and steps_per_epoch is set from them. So a
128-pixel configuration and a 32-pixel one are compared at equal cost, and a space states what a
user decides, time, not steps. The config that trains (recorded with the trial or the model
file) holds the steps it ran and `seconds` 0: it retrains the same way on any machine.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from segcore.config import TrialConfig
from segcore.data import Dataset, normalization_for
from segcore.device import grad_scaler, memory_format_for
from segcore.model import build_model
from segcore.patches import train_batches

WARMUP, TIMED = 2, 8  # steps


def step_seconds(cfg: TrialConfig, train_set: Dataset, device: torch.device) -> float:
    """Seconds of one training step of `cfg` on `device` (the mean of TIMED steps after WARMUP;
    the weights it trains are thrown away)."""
    from segcore.train import make_optimizer, train_step

    data = train_set.normalized(normalization_for(cfg.normalization, train_set))
    model = build_model(cfg.arch, data.channels, len(data.classes), cfg.depth, cfg.base_width,
                        cfg.max_width).to(device, memory_format=memory_format_for(device))  # fmt: skip
    optimizer, scaler = make_optimizer(cfg, model.parameters()), grad_scaler(device)
    stream = train_batches(
        data.images, data.masks, patch_size=cfg.patch_size, batch_size=cfg.batch_size,
        aug_strength=cfg.aug_strength, fg_fraction=cfg.fg_fraction, seed=cfg.seed + 1,
        processes=cfg.aug_processes, pin_memory=device.type == "cuda",
    )  # fmt: skip
    try:
        model.train()
        for i in range(WARMUP + TIMED):
            if i == WARMUP:
                _sync(device)
                started = time.perf_counter()
            train_step(model, optimizer, scaler, next(stream), cfg.loss, device)
        _sync(device)
        return (time.perf_counter() - started) / TIMED
    finally:
        stream.close()
        del model, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def budgeted(
    cfg: TrialConfig, train_set: Dataset, device: torch.device, ran: dict | None = None
) -> tuple[TrialConfig, float | None]:
    """(cfg with its steps per epoch, the measured seconds per step or None): `cfg` itself when
    it has no `seconds`; the steps of `ran` (the config an interrupted run of it recorded), so
    that a resumed run goes on with the schedule it started; else measured here."""
    if not cfg.seconds:
        return cfg, None
    if ran is not None and ran.get("seconds") == 0 and same_request(cfg, ran):
        return TrialConfig.from_dict(ran), None
    step = step_seconds(cfg, train_set, device)
    steps = max(1, round(cfg.seconds / (cfg.epochs * step)))
    return dataclasses.replace(cfg, steps_per_epoch=steps, seconds=0.0), step


def same_request(cfg: TrialConfig, ran: dict) -> bool:
    """Whether `ran` (a recorded config) is `cfg` itself, or `cfg`'s seconds turned into steps."""
    mine, ran = cfg.to_dict(), TrialConfig.from_dict(ran).to_dict()  # files of older versions
    steps = {"seconds": 0.0, "steps_per_epoch": ran["steps_per_epoch"]}
    return mine == ran or (bool(cfg.seconds) and {**mine, **steps} == ran)
