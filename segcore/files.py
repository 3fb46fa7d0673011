"""Atomic file writes and the model file (weights plus everything needed to use them)."""

from __future__ import annotations

import os
import pickle
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from segcore.config import TrialConfig
from segcore.data import Normalization
from segcore.device import memory_format_for
from segcore.errors import UserError
from segcore.infer import Ensemble
from segcore.labels import Labels
from segcore.model import build_model

MODEL_FORMAT = "train_optuna.model/1"


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) on a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


MIN_FREE_MB = 200  # checkpoints, pictures and logs of a search


def check_writable(folder: str | Path, what: str) -> None:
    """Refuse up front a folder (or the nearest existing folder above it) that cannot be written
    or is nearly full, before a search starts; `what` names the option or folder in the error."""
    probe = Path(folder).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{what}: {probe} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise UserError(f"{what}: cannot write in {probe} ({e.strerror})") from None
    free_mb = shutil.disk_usage(probe).free // 2**20
    if free_mb < MIN_FREE_MB:
        raise UserError(f"{what}: only {free_mb} MiB free in {probe}; need {MIN_FREE_MB} MiB")


def check_output(path: str | Path, option: str, folder: bool = False) -> None:
    """Refuse up front an output path that cannot be written: a folder where a file goes (or the
    reverse), a file in the way of its folder, a folder that cannot be written."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        kind = "a folder" if path.is_dir() else "a file"
        raise UserError(f"{option} {path}: is {kind}; give a {'folder' if folder else 'file'}")
    check_writable(path if folder else path.parent, f"{option} {path}")


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def save_model(
    path: str | Path,
    state: dict[str, torch.Tensor],
    cfg: TrialConfig,
    *,
    in_channels: int,
    labels: Labels,
    norm: Normalization,
    extra: dict | None = None,
    members: list[tuple[dict[str, torch.Tensor], TrialConfig]] = (),
) -> None:
    """Write a model file that loads with weights_only=True: tensors and plain values only.
    The class mapping (`labels`) and the input normalisation belong to the model: evaluate and
    predict decode and normalise any folder with them. With `members` (weights and config of
    more models of the same classes), the file is an ensemble: load_model gives an Ensemble of
    this model and them."""
    payload = {
        "format": MODEL_FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in state.items()},
        "config": cfg.to_dict(),
        "in_channels": in_channels,
        "classes": list(labels.classes),
        "palette": [list(c) for c in labels.colors],
        "labels": labels.to_dict(),
        "normalization": norm.to_dict(),
        "extra": extra or {},
    }
    if members:
        payload["members"] = [{"state_dict": {k: v.detach().cpu() for k, v in st.items()},
                               "config": c.to_dict()} for st, c in members]  # fmt: skip
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def _build(config: dict, state: dict, payload: dict, path: Path) -> tuple:
    """(model with `state` loaded, its TrialConfig) for one model of a model file."""
    cfg = TrialConfig.from_dict(config, str(path))
    model = build_model(cfg.arch, payload["in_channels"], len(payload["classes"]), cfg.depth,
                        cfg.base_width, cfg.max_width)  # fmt: skip
    model.load_state_dict(state)
    return model, cfg


def load_model(path: str | Path, device: torch.device):
    """(model in eval mode on `device`, payload dict) from a model file; refuses pickled code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: model file not found")
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path}: not a model file (not a torch.save archive)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln]
        reason = lines[0] if lines else "it holds more than tensors and plain values"
        raise UserError(f"{path}: not a safe model file, refused to load ({reason})") from None
    except Exception as e:  # noqa: BLE001 (a corrupt archive surfaces as many types)
        raise UserError(f"{path}: not a model file ({type(e).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise UserError(f"{path}: not a train_optuna model file")
    try:  # a file edited by hand, or whose parts do not fit together
        parts = [payload, *payload.get("members", [])]
        built = [_build(p["config"], p["state_dict"], payload, path) for p in parts]
        cfg = built[0][1]
        model = built[0][0] if len(built) == 1 else Ensemble(*zip(*built))
        payload["config"] = cfg
        payload["palette"] = [tuple(c) for c in payload["palette"]]
        recorded = payload.get("labels")  # older model files: class indices and the palette
        payload["labels"] = (Labels.from_dict(recorded, str(path)) if recorded else
                             Labels.plain(payload["classes"], payload["palette"]))  # fmt: skip
        payload["normalization"] = Normalization.from_dict(payload.get("normalization"))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"{path}: damaged model file ({type(e).__name__}: {reason})") from None
    model = model.to(device, memory_format=memory_format_for(device))
    return model.eval(), payload


EVAL_DATA_SEED = 1  # evaluate's default without --data: other images from the same generator


def model_and_images(model_file: str, device: str | None, folder: str | None,
                     part: str | None = None):  # fmt: skip
    """(model, model-file payload, images normalised as the model was trained): `folder`, its
    masks decoded with the model's classes; with `part` (train, validation, test) only the
    images of that part of the model's split, from the model's own data when no folder."""
    from segcore.data import dataset_from, load_images
    from segcore.device import pick_device

    model, meta = load_model(model_file, pick_device(device))
    extra, labels = meta["extra"], meta["labels"]
    if part is not None:
        names = (extra.get("split") or {}).get(part)
        if names is None:
            raise UserError(f"--split {part}: {model_file} records no split (an older model file)")
        if folder is None:
            folder = (extra.get("test_data") if part == "test" else None) or extra.get("data")
            where = folder or "synthetic data (seed 0)"
            print(f"note: no --data given; using the model's {part} images from {where}",
                  file=sys.stderr)  # fmt: skip
        dataset = dataset_from(folder, labels)
        keep = set(names)
        idx = [i for i, n in enumerate(dataset.names) if n in keep]
        if len(idx) != len(keep):
            raise UserError(f"--split {part}: {len(keep) - len(idx)} of {model_file}'s {part} "
                            f"images are not in {folder or 'the synthetic data'}")  # fmt: skip
        dataset = dataset.subset(idx)
    elif folder is None:
        from segcore.synthetic import synthetic_dataset

        print(f"note: no --data given; using 20 synthetic images (seed {EVAL_DATA_SEED})",
              file=sys.stderr)  # fmt: skip
        dataset = synthetic_dataset(20, EVAL_DATA_SEED)
    else:
        dataset = load_images(folder, labels)
    if dataset.channels != meta["in_channels"]:
        raise UserError(
            f"{folder}: images have {dataset.channels} channel(s), the model "
            f"{model_file} expects {meta['in_channels']}"
        )
    if dataset.masks is not None and dataset.classes != meta["classes"]:  # synthetic data
        raise UserError(f"{folder or 'synthetic data'}: classes {dataset.classes} are not the "
                        f"model's {meta['classes']}; give --data")  # fmt: skip
    return model, meta, dataset.normalized(meta["normalization"])
