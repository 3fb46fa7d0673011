"""What a configuration's model costs to use: parameters, FLOP per patch, stitched ms per image.

Measured before a trial trains (none of it depends on the weights), so that a model over a
space's `constraints:` is pruned before it costs anything.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from segcore.config import TrialConfig
from segcore.infer import predict_probs, prepare
from segcore.model import build_model, count_parameters

LIMITS = {  # the constraints a space may set, and the cost each one bounds
    "max_params": "params",
    "max_gflop_per_patch": "gflop_per_patch",
    "max_infer_ms": "infer_ms",
}


def measure(
    cfg: TrialConfig, channels: int, classes: int, image: np.ndarray, device: torch.device
) -> dict[str, float | int | str]:
    """params; forward GFLOP for one patch_size patch; milliseconds of stitched inference of
    `image` (H, W, C) on `device` with the config's tiles, overlap, weights and TTA (best of
    two runs after a warm-up)."""
    model = build_model(cfg.arch, channels, classes, cfg.depth, cfg.base_width, cfg.max_width)
    params = count_parameters(model)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(torch.zeros(1, channels, cfg.patch_size, cfg.patch_size))
    model = prepare(model, device)
    runs = []
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        predict_probs(model, image, tile=cfg.tile, overlap=cfg.tile_overlap,
                      gaussian=cfg.gaussian, tta=cfg.tta)  # fmt: skip
        if device.type == "cuda":
            torch.cuda.synchronize()
        runs.append(time.perf_counter() - started)
    return {
        "params": params,
        "gflop_per_patch": counter.get_total_flops() / 1e9,
        "infer_ms": 1000 * min(runs[1:]),
        "infer_device": device.type,
    }


def violations(costs: dict, constraints: dict[str, float]) -> list[str]:
    """Which limits the costs break, in words (empty: feasible)."""
    return [
        f"{LIMITS[limit]} {costs[LIMITS[limit]]:.4g} above {limit} {bound:.4g}"
        for limit, bound in constraints.items()
        if costs[LIMITS[limit]] > bound
    ]


def constraint_values(costs: dict | None, constraints: dict[str, float]) -> list[float]:
    """Optuna's constraints_func form: one value per limit, feasible when <= 0 (relative, so
    that limits of different units weigh alike); unmeasured counts as infeasible."""
    if not costs:
        return [1.0] * len(constraints)
    return [costs[LIMITS[limit]] / bound - 1 for limit, bound in constraints.items()]
