"""A search space planned from the data's fingerprint and the machine (`--space auto`).

nnU-Net's experiment planning derives a patch size, a batch size and a network depth from the
data set's median image size and the GPU's memory, and is hard to beat by hand. The same rules,
for 2-D images, give the centre of a space; the search runs around it, and the centre itself is
the warm start (trial 0, always a finalist):

- **Patch**: as large as the images allow (the median short side) up to the device's cap
  (`PATCH_CAP`), a multiple of 32. Searched: 1/2, 3/4 and all of it (those that are multiples
  of 16). On a GPU the cap is nnU-Net's memory rule (256: more context per step). On the CPU it
  is what converges in the minutes a search has: 64. With a cap of 128 (2026-12-06/07, 2 cores)
  the planned centre (patch 128, depth 5) reached 0.849 on whole HeLa validation frames in 300 s
  against 0.864 for a patch-64 finalist (0.955 against 0.976 on `shapes`), trained alone for
  600 s it scored under the recipe on test (0.8627 against 0.8677), and all seven searches
  handed over a patch-64 model (docs/benchmarks.md). With the batch and width below, the CPU
  centre is the CPU recipe's configuration (patch 64, depth 4, batch 16, width 16) wherever the
  images hold a 64-pixel patch: the rules arrive where hand tuning did, and the search runs
  around it in time, not epochs.
- **Depth**: as deep as the patch allows with a bottom feature map of at least 4 pixels, at most
  5 (nnU-Net's rule). Searched down to the shallowest depth whose receptive field covers the
  largest objects (95th percentile of the foreground objects' bounding-box side; a U-Net of
  depth d with two 3x3 convolutions per stage sees `receptive_field(d)` pixels), and at least
  one below the deepest, so that the search can tell whether depth matters.
- **Batch**: the device's pixels per step (`PIXELS_PER_STEP`) divided by the patch's pixels, 2 to
  64: a larger patch trains on fewer patches a step at the same cost. On the CPU 2^16, 16
  patches of 64 (the CPU recipe's batch).
- **Width**: fixed by device (`WIDTH`: 16 on the CPU, nnU-Net's 32 on a GPU), not searched. With
  budgets in seconds a narrow network takes more steps in a trial's 30 s and wins the trials,
  then loses at the final budget: every width-8 winner of the first runs (2026-12-06/07, CPU)
  scored under the width-16 recipe on test (-0.003 and -0.007 on `shapes`, -0.007 on HeLa); with
  the width fixed the same searches handed over +0.006 (HeLa) and +0.010 (`shapes`) more
  (docs/benchmarks.md).
- Learning rate and augmentation: today's ranges (log 1e-3 to 0.2; 0 to 1), centred on the
  CPU recipe's 0.05 and 0.25.
- **Budgets in seconds** (`seconds`): a trial trains for `TRIAL_SECONDS`, the finalists for
  `PROMOTE_SECONDS` (a `promote:` section where it is under the final's) and the final fit for
  `FINAL_SECONDS`; the steps per epoch follow from the step time measured on the device
  (segcore.budget), so a 64-pixel configuration and a 32-pixel one cost the same. On the CPU
  the final fit has twice the finalists' time: with 300 s (2026-12-06) the model handed over on
  `shapes` trained half the recipe's patches on a float32 CPU and scored 0.003 under it
  (docs/benchmarks.md); trials are cut to 30 s to pay for most of it.
- **No ensemble**: the winner is refitted on train + validation. Averaging the two finalists'
  own models instead (`final: {ensemble: 2, train_on: train}`, no refit, each finalist 600 s on
  one core) was measured on HeLa (2026-12-07): 0.8621 test mIoU against the recipe's 0.8677.
  Averaging added +0.0013 over the winner alone, but its members trained on 9 of the 12 frames
  and for half the recipe's steps; on a data set this small the refit on all of them matters
  more (on `shapes` the ensemble added +0.0017 and -0.0001 over the winner alone, two seeds).

The space is written out as a normal space file (reports/NAME/space.yaml) that a user can read,
edit and run with `--space FILE`.
"""

from __future__ import annotations

from typing import Any

import yaml

MIN_BOTTOM = 4  # pixels of the deepest feature map (nnU-Net's minimum)
MAX_DEPTH = 5
PATCH_CAP = {"cpu": 64, "cuda": 256}
PIXELS_PER_STEP = {"cpu": 2**16, "cuda": 2**19}  # 16 patches of 64 on the CPU, 32 of 128 on a GPU
WIDTH = {"cpu": 16, "cuda": 32}
MAX_WIDTH = {"cpu": 256, "cuda": 512}
TRIAL_SECONDS = {"cpu": 30, "cuda": 60}
PROMOTE_SECONDS = {"cpu": 300, "cuda": 600}
FINAL_SECONDS = {"cpu": 600, "cuda": 600}
TRIALS = {"cpu": 24, "cuda": 100}
EPOCHS = 12  # of a trial: the pruner's steps; the final fit's epochs are FINAL_EPOCHS
FINAL_EPOCHS = 40


def receptive_field(depth: int) -> int:
    """Pixels seen by one bottom feature of a U-Net of `depth` poolings (2x2, stride 2), two 3x3
    convolutions per stage."""
    field, jump = 1, 1
    for stage in range(depth + 1):
        field += 2 * 2 * jump  # two 3x3 convolutions
        if stage < depth:
            field += jump  # a 2x2 pooling
            jump *= 2
    return field


def object_side(fp: dict[str, Any]) -> int:
    """The largest foreground objects' side in pixels (95th percentile over each class's
    objects, the largest class), 0 without objects."""
    sides = [c.get("p95_side", c.get("max_side", 0)) for c in fp.get("classes", [])[1:]]
    return int(max(sides, default=0))


def deepest(patch: int) -> int:
    """The deepest depth (at most MAX_DEPTH) whose bottom feature map of `patch` is MIN_BOTTOM
    pixels or more."""
    depth = 1
    while depth < MAX_DEPTH and patch % 2 ** (depth + 1) == 0:
        if patch // 2 ** (depth + 1) < MIN_BOTTOM:
            break
        depth += 1
    return depth


def plan(fp: dict[str, Any], device: str) -> dict[str, Any]:
    """The centre of the space for a data set (`fp`: segcore.fingerprint) on a device kind
    ('cpu' or 'cuda'), with the figures it came from."""
    short = min(fp["size_median"])
    patch = max(32, min(PATCH_CAP[device], short) // 32 * 32)
    side = object_side(fp)
    depth = deepest(patch)
    covering = next((d for d in range(2, MAX_DEPTH + 1) if receptive_field(d) >= side), MAX_DEPTH)
    batch = max(2, min(64, PIXELS_PER_STEP[device] // patch**2))
    return {
        "patch_size": patch,
        "depth": depth,
        "covering_depth": covering,
        "min_depth": max(2, min(covering, depth - 1)),
        "batch_size": batch,
        "base_width": WIDTH[device],
        "object_side": side,
        "receptive_field": receptive_field(depth),
        "short_side": short,
    }


def auto_space(fp: dict[str, Any], device: str) -> dict[str, Any]:
    """A space file (as parsed YAML) around plan()'s centre; its warm start is the centre."""
    centre = plan(fp, device)
    patch, depth = centre["patch_size"], centre["depth"]
    patches = sorted({p for p in (patch // 2, patch * 3 // 4, patch) if p >= 32 and p % 16 == 0})
    promote = PROMOTE_SECONDS[device]
    return {
        "search": {
            "patch_size": {"type": "categorical", "choices": patches},
            "depth": {"type": "int", "low": min(centre["min_depth"], depth), "high": depth},
            "lr": {"type": "float", "low": 1.0e-3, "high": 0.2, "log": True},
            "aug_strength": {"type": "float", "low": 0.0, "high": 1.0},
        },
        "fixed": {
            "epochs": EPOCHS,
            "seconds": TRIAL_SECONDS[device],
            "batch_size": centre["batch_size"],
            "base_width": centre["base_width"],
            "max_width": MAX_WIDTH[device],
            "optimizer": "sgd",
            "schedule": "poly",
            "loss": "ce+dice",
            "fg_fraction": 0.5,
            "val_patches_per_image": 8,
            "aug_processes": 0 if device == "cpu" else 4,
            "gaussian": True,
            "tta": True,
        },
        "final": {"epochs": FINAL_EPOCHS, "seconds": FINAL_SECONDS[device]},
        **({"promote": {"seconds": promote}} if promote < FINAL_SECONDS[device] else {}),
        "study": {
            "n_trials": TRIALS[device],
            "metric": "patch_miou",
            "sampler": {"name": "tpe", "args": {"n_startup_trials": 8 if device == "cpu" else 10}},
            "pruner": (
                {"name": "median", "args": {"n_startup_trials": 4, "n_warmup_steps": 4}}
                if device == "cpu"
                else {"name": "asha", "args": {"min_resource": 2, "reduction_factor": 3}}
            ),
            "top_k": 3,
            "finalists": 2 if device == "cpu" else 3,
            "warm_start": {
                "patch_size": patch,
                "depth": depth,
                "lr": 0.05,
                "aug_strength": 0.25,
            },
        },
    }


def space_text(fp: dict[str, Any], device: str, where: str) -> str:
    """auto_space as a space file, headed by the figures and rules it came from."""
    c = plan(fp, device)
    head = [
        f"Planned by `--space auto` from {where} on the {device.upper()} (segsearch/plan.py):",
        f"median image {fp['size_median'][0]} x {fp['size_median'][1]}; largest objects "
        + f"{c['object_side']} px (95th percentile of the bounding-box sides).",
        f"Patch {c['patch_size']}: the median short side ({c['short_side']}) up to the "
        + f"{device.upper()} cap of {PATCH_CAP[device]}, a multiple of 32.",
        f"Depth {c['depth']}: the deepest with a bottom map of {MIN_BOTTOM} px or more "
        + f"(receptive field {c['receptive_field']} px); searched from depth {c['min_depth']} "
        + f"(depth {c['covering_depth']} is the shallowest whose receptive field, "
        + f"{receptive_field(c['covering_depth'])} px, covers the largest objects; at least one "
        + "below the deepest).",
        f"Batch {c['batch_size']}: {PIXELS_PER_STEP[device]} pixels a step. Width "
        + f"{c['base_width']}, fixed: a narrower network wins trials timed in seconds by taking "
        + "more steps, then loses at the final budget. Trials train "
        + f"{TRIAL_SECONDS[device]} s, the finalists {PROMOTE_SECONDS[device]} s, the final fit "
        + f"{FINAL_SECONDS[device]} s (steps per epoch from the step time measured on the device).",
        "The warm start (trial 0, always a finalist) is that centre. Edit this file and run it "
        + "with --space FILE.",
    ]
    body = yaml.safe_dump(auto_space(fp, device), sort_keys=False, default_flow_style=None)
    return "".join(f"# {line}\n" for line in head) + body
