"""The training loop: random patches -> U-Net -> loss, patch mIoU after every epoch.

It knows nothing of optuna: the search adapts it through the on_epoch callback, which may
raise (for example to prune) and so stop training.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from segcore.config import TrialConfig
from segcore.data import ZSCORE, Dataset, Normalization, normalization_for
from segcore.device import autocast_for, grad_scaler, memory_format_for, pick_device, to_device
from segcore.errors import DivergedError
from segcore.metrics import confusion_matrix, mean_iou
from segcore.model import build_model
from segcore.patches import train_batches, validation_patches
from segcore.progress import Progress

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """The kept epoch's weights (on the CPU) and the per-epoch history; without validation
    images the kept epoch is the last and best_patch_miou is None."""

    state_dict: dict[str, torch.Tensor]
    best_epoch: int
    best_patch_miou: float | None
    history: list[dict] = field(default_factory=list)
    norm: Normalization = ZSCORE  # the input normalisation, fitted to the training images


def _on_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t.detach().cpu().clone() for n, t in state.items()}


def seed_everything(seed: int) -> None:
    """Seed Python's random, numpy and torch (batchgenerators draws from the first two)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_factor(schedule: str, step: int, total: int) -> float:
    """Multiplier of the base learning rate at a step (0-based) of `total` steps."""
    if schedule == "step":  # the reference recipe: a tenth of the rate for the second half
        return 1.0 if step < total // 2 else 0.1
    if schedule == "poly":  # nnU-Net's decay
        return (1 - step / total) ** 0.9
    return 1.0


def make_optimizer(cfg: TrialConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def seg_loss(logits: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Cross-entropy, plus soft Dice over all classes and the whole batch for "ce+dice"."""
    logits = logits.float()
    loss = F.cross_entropy(logits, target)
    if kind == "ce+dice":
        probs = logits.softmax(1)
        onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
        inter = (probs * onehot).sum((0, 2, 3))
        denom = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
        loss = loss + 1 - ((2 * inter + 1e-5) / (denom + 1e-5)).mean()
    return loss


@torch.no_grad()
def patch_miou(model, x: torch.Tensor, y: torch.Tensor, num_classes: int, batch: int = 64) -> float:
    """mIoU over all pixels of a fixed patch set (x (N, C, P, P), y (N, P, P))."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    cm = np.zeros((num_classes, num_classes), np.int64)
    with autocast_for(device):
        for i in range(0, len(x), batch):
            pred = model(to_device(x[i : i + batch], device)).argmax(1)
            cm += confusion_matrix(pred, y[i : i + batch].to(device), num_classes)
    model.train(was_training)
    return mean_iou(cm)


def train_step(model, optimizer, scaler, batch, loss_kind: str, dev: torch.device) -> float:
    """One step on a batch (x, y) from train_batches, through the device's gradient scaler
    (device.grad_scaler: active for fp16 only); returns the loss (not stepped when it is not
    finite: training stops there)."""
    x, y = to_device(batch[0], dev), batch[1].to(dev, non_blocking=True)
    with autocast_for(dev):
        loss = seg_loss(model(x), y, loss_kind)
    if not torch.isfinite(loss):
        return float(loss.item())
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return float(loss.item())


def train(
    cfg: TrialConfig,
    train_set: Dataset,
    val_set: Dataset | None,
    *,
    on_epoch: Callable[[int, float], None] | None = None,
    device: torch.device | None = None,
    progress: bool = True,
    resume: dict | None = None,
    on_saved: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train one configuration on `device` (default: pick_device()), its input normalisation
    fitted to the training images (cfg.normalization); returns the weights of the
    epoch with the best validation patch mIoU (on_epoch(epoch, it) after each epoch), or with
    no validation images (val_set None) those of the last epoch.

    After each epoch, before on_epoch, on_saved(state) gets everything needed to go on from
    there (weights, optimizer, schedule, random states, the best so far, the history); given
    back as `resume`, training continues as if it had never stopped (exactly, on the CPU and
    with in-process augmentation)."""
    seed_everything(cfg.seed)
    dev = device or pick_device()
    norm = normalization_for(cfg.normalization, train_set)
    train_set = train_set.normalized(norm)
    val_set = val_set.normalized(norm) if val_set is not None else None
    k = len(train_set.classes)
    model = build_model(cfg.arch, train_set.channels, k, cfg.depth, cfg.base_width, cfg.max_width)
    model = model.to(dev, memory_format=memory_format_for(dev))
    optimizer = make_optimizer(cfg, model.parameters())
    scaler = grad_scaler(dev)
    total = cfg.epochs * cfg.steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(cfg.schedule, s, total)
    )
    result, first, seed = TrainResult({}, -1, float("-inf"), norm=norm), 0, cfg.seed
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        torch.set_rng_state(resume["torch_rng"])
        best = resume["best"]
        result = TrainResult(best["state_dict"], best["epoch"], best["miou"], resume["history"],
                             norm)  # fmt: skip
        first = resume["epoch"] + 1
        if resume["batches"] is None:  # augmentation processes: a fresh stream, not a replay
            seed = int(np.random.SeedSequence([cfg.seed, first]).generate_state(1)[0] >> 1)
    if val_set is not None:  # one patch set of one size (val_patch) for every trial of a study
        vx, vy = (torch.from_numpy(a) for a in validation_patches(
            val_set.images, val_set.masks, patch_size=cfg.val_patch,
            per_image=cfg.val_patches_per_image, seed=cfg.seed,
        ))  # fmt: skip
        if dev.type == "cuda":
            vx, vy = vx.pin_memory(), vy.pin_memory()
    stream = train_batches(
        train_set.images, train_set.masks, patch_size=cfg.patch_size,
        batch_size=cfg.batch_size, aug_strength=cfg.aug_strength, fg_fraction=cfg.fg_fraction,
        seed=seed, processes=cfg.aug_processes, pin_memory=dev.type == "cuda",
        resume=resume["batches"] if resume is not None else None,
    )  # fmt: skip
    bar = Progress(total, "train", "steps", enabled=progress, initial=first * cfg.steps_per_epoch)
    try:
        model.train()
        for epoch in range(first, cfg.epochs):
            started, losses = time.perf_counter(), []
            for step in range(cfg.steps_per_epoch):
                loss = train_step(model, optimizer, scaler, next(stream), cfg.loss, dev)
                if not math.isfinite(loss):
                    raise DivergedError(
                        f"loss became {loss} at epoch {epoch} step {step} "
                        f"(lr {scheduler.get_last_lr()[0]:.3g})"
                    )
                scheduler.step()
                losses.append(loss)
                bar.update()
            miou = None if val_set is None else patch_miou(model, vx, vy, k)
            result.history.append({
                "epoch": epoch, "loss": float(np.mean(losses)), "patch_miou": miou,
                "lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - started,
            })  # fmt: skip
            scored = "" if miou is None else f"validation patch mIoU {miou:.4f}, "
            line = (
                f"epoch {epoch + 1}/{cfg.epochs}: loss {np.mean(losses):.4f}, {scored}"
                f"{time.perf_counter() - started:.1f} s"
            )
            if progress:
                bar.write(line)
            else:
                log.info(line)
            if miou is None or miou > result.best_patch_miou:
                result.best_epoch, result.best_patch_miou = epoch, miou
                result.state_dict = _on_cpu(model.state_dict())
            if on_saved is not None:
                on_saved({
                    "epoch": epoch, "model": _on_cpu(model.state_dict()),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "torch_rng": torch.get_rng_state(), "batches": stream.rng_state(),
                    "history": result.history, "best": {"state_dict": result.state_dict,
                    "epoch": result.best_epoch, "miou": result.best_patch_miou},
                })  # fmt: skip
            if on_epoch is not None and miou is not None:
                on_epoch(epoch, miou)
    finally:
        bar.close()
        stream.close()
    return result
