"""What the commands do around the workers: `search` and `slurm` check every option and file and
create or resume the study (prepare_study, a planned space for `--space auto`); `finish` and
`final` run the promotion stage and the final fit on the search's devices (hand_over) and print
the last lines. `args` is the command line's namespace (train_optuna.py builds it)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from segcore.errors import UserError

AUTO = "auto"  # --space auto: a space planned from the data and the machine (segsearch.plan)
MAX_WORKERS = 64  # per machine: each worker holds torch and a data set in memory


def study_args(args, create: bool = False) -> tuple[str, str]:
    """(study name, storage URL); only `search` may create the default SQLite file, and it first
    checks that storage/ (logs, checkpoints), reports/ and a SQLite file's folder can be written."""
    from segcore.files import check_writable
    from segsearch.storage import default_url, sqlite_path, storage_url
    from segsearch.study import check_name

    name = check_name(args.study)
    url = storage_url(name, args.storage)
    path = sqlite_path(url)
    if create:
        check_writable("storage", "storage folder")
        check_writable("reports", "reports folder")
        if path is not None:
            check_writable(path.parent, "--storage")
        if url == default_url(name):
            Path("storage").mkdir(exist_ok=True)  # the default SQLite file's folder
    elif path is not None and not path.is_file():
        # only `search` creates a study; opening a missing file would create an empty one
        if url == default_url(name):
            raise UserError(f"--study {name!r}: storage/{name}.db not found (run search first)")
        raise UserError(f"--storage {url}: file not found")
    elif path is not None and path.stat().st_size == 0:
        raise UserError(f"--storage {url}: an empty file, no study in it")
    return name, url


def prepare_study(args, workers: str, on_gpus: bool = False):
    """What search and slurm do before any worker: check every option and file, create or
    resume the study; returns (name, url, space). `workers` is said in the first line;
    `on_gpus`: the trials train on GPUs (what `--space auto` plans for)."""
    import shutil

    from segcore.device import pick_device
    from segsearch.space import load_space
    from segsearch.storage import check_url, default_url, mask_url, storage_url
    from segsearch.study import cache_dir, check_name, create_study, folder_of, load_splits

    if args.n_trials is not None and args.n_trials < 1:
        raise UserError(f"--n-trials: must be at least 1, got {args.n_trials}")
    check_timeout(args.timeout)
    pick_device(args.device)  # a bad --device is an error now, not after the trials
    url = storage_url(check_name(args.study), args.storage)
    if url != default_url(args.study):  # the default's folder is made below, after the checks
        check_url(url)  # before the data, which takes a while to read
    path, planned = planned_space(args, on_gpus, url) if args.space == AUTO else (args.space, None)
    made = None
    try:  # every file read and decoded once into the cache the workers map, before any worker
        space = load_space(path)
        data = str(Path(args.data).resolve()) if args.data else None
        test_data = str(Path(args.test_data).resolve()) if args.test_data else None
        folder = folder_of(args.study, url, getattr(args, "artifacts", None))
        cache = cache_dir(folder)
        made = next((p for p in reversed(cache.parents) if not p.exists()), None)
        made = made or (None if cache.exists() else cache)
        name, url = study_args(args, create=True)
        splits = load_splits(data, test_data, space, cache=cache)
        study, _ = create_study(name, url, space, data, args.n_trials, test_data, splits, folder)
    except BaseException as e:  # nothing half-written: the folders and the planned space go
        if made is not None and isinstance(e, UserError):
            shutil.rmtree(made, ignore_errors=True)
        if planned is not None:
            planned.unlink(missing_ok=True)
        raise
    if "fingerprint" not in study.user_attrs:
        from segcore.fingerprint import fingerprint
        from segsearch.notes import data_note
        from segsearch.space import largest_patch

        fp = fingerprint(splits.train.join(splits.val).join(splits.test), largest_patch(space))
        study.set_user_attr("fingerprint", fp)
        data_note(study)
        for line in fp["warnings"]:
            print(f"warning: {line}", file=sys.stderr)
    print(f"study {name} on {mask_url(url)}: {workers}; logs and files in {folder}; images: "
          f"{len(splits.train.names)} train, {len(splits.val.names)} validation (chooses), "
          f"{len(splits.test.names)} test (read only by the final fit)", file=sys.stderr)  # fmt: skip
    return name, url, space


def fingerprint_of(data: str | None) -> dict:
    from segcore.data import dataset_from
    from segcore.fingerprint import fingerprint

    return fingerprint(dataset_from(data))


def planned_space(args, on_gpus: bool, url: str) -> tuple[Path, Path | None]:
    """(reports/NAME/space.yaml, the same path if planned now from --data on this machine, else
    None): a study's space is planned when the study is created, and later runs read the file
    as it is, edited or not (a file left without its study is planned again)."""
    from segcore.files import check_output, write_text
    from segsearch.plan import space_text
    from segsearch.study import check_name, reports_dir, study_exists

    path = reports_dir(check_name(args.study)) / "space.yaml"
    if path.is_file() and study_exists(args.study, url):
        return path, None  # the study's own, as planned (or edited) then
    where = args.data or "synthetic data"
    text = space_text(fingerprint_of(args.data), "cuda" if on_gpus else "cpu", where)
    check_output(path, "--space auto")
    write_text(path, text)
    print(f"--space auto: planned {path} from {where}", file=sys.stderr)
    return path, path


def worker_slots(args) -> tuple[int, list[int]]:
    """(processes, GPUs) of --workers, --gpus and --workers-per-gpu: what the search's workers
    use, and the promotion stage's finalists after them."""
    from segcore.device import pick_device
    from segsearch.launcher import parse_gpus

    if args.workers is not None and not 1 <= args.workers <= MAX_WORKERS:
        raise UserError(
            f"--workers: from 1 to {MAX_WORKERS} on one machine (more machines: `worker` on "
            f"each, or `slurm`), got {args.workers}"
        )
    if args.workers_per_gpu < 1:
        raise UserError(f"--workers-per-gpu: must be at least 1, got {args.workers_per_gpu}")
    gpus = parse_gpus(args.gpus)
    device = args.device or "auto"
    if device == "cpu":  # the CPU forced: no GPU, whatever is visible
        if args.gpus not in ("auto", "none"):
            raise UserError(f"--device cpu: conflicts with --gpus {args.gpus}; give one of them")
        gpus = []
    elif device.startswith("cuda"):
        pick_device(device)  # the GPU must exist
        if not gpus:
            raise UserError(f"--device {device}: conflicts with --gpus {args.gpus}")
        if ":" in device and args.gpus == "auto":  # that GPU only
            gpus = [int(device.split(":")[1])]
    return args.workers or (len(gpus) * args.workers_per_gpu if gpus else 2), gpus


def search_device(gpus: list[int]) -> str:
    """Where rescoring and the final fit run: the first of the search's GPUs, or the CPU when
    the search trained there (never silently another device)."""
    return f"cuda:{gpus[0]}" if gpus else "cpu"


def where_text(gpus: list[int], n_workers: int) -> str:
    """The device, precision and threads a search's workers run with, for its first line."""
    import torch

    from segcore.device import precision_for, usable_cpus

    device = torch.device(search_device(gpus))
    what = f"GPU {','.join(map(str, gpus))}" if gpus else "the CPU"
    threads = max(1, usable_cpus() // n_workers)
    return f"on {what} in {precision_for(device)}, {threads} thread(s) each"


def hand_over(args, name: str, url: str, workers: tuple[int, list[int]]) -> None:
    """The promotion stage (when the space has finalists), then the final fit of the winner."""
    from segcore.device import pick_device
    from segsearch.final import export, final_fit
    from segsearch.launcher import device_kind
    from segsearch.promote import budget_text, margin_text, promote
    from segsearch.study import open_study

    space = open_study(name, url)[1]
    if space.finalists:
        scores = promote(name, url, workers=workers[0], gpus=workers[1],
                         device=device_kind(workers[1]), quiet=args.quiet)  # fmt: skip
        for number, s in scores.items():
            print(f"finalist trial {number}: validation full-image mIoU {s['miou']:.4f} (95 % "
                  f"interval {s['interval'][0]:.4f} to {s['interval'][1]:.4f}) at "
                  f"{budget_text(space)}, epoch {s['kept_epoch'] + 1} kept")  # fmt: skip
    best = json.loads(export(name, url).read_text())
    why = margin_text(best["validation"]["noise"]) if space.finalists else ""
    if why:  # how sure the choice among the finalists is
        print(why)
    cfg = best["config"]
    steps = (
        f"in about {cfg['seconds']:g} s" if cfg["seconds"] else f"of {cfg['steps_per_epoch']} steps"
    )
    what = (f"the ensemble of the best {space.ensemble} finalists (no training)" if
            space.ensemble > 1 else f"final fit of trial {best['trial']} ({cfg['epochs']} epochs "
            f"{steps}, on {cfg['train_on']})")  # fmt: skip
    print(what, file=sys.stderr)
    final_fit(name, url, device=pick_device(search_device(workers[1])), progress=not args.quiet)


def check_timeout(timeout: float | None) -> None:
    if timeout is not None and not timeout >= 0:
        raise UserError(f"--timeout: seconds, at least 0, got {timeout}")


def print_final(name: str, url: str) -> None:
    """The last lines of a search or `final`: the model handed over, its honest figure."""
    from segsearch.final import best_record
    from segsearch.study import open_study, reports_dir

    study, space = open_study(name, url)
    best = best_record(study, space)
    v = best["validation"]["full_image_miou"]
    if best["test"] is None:
        print(f"best config: {reports_dir(name)}/best.json (trial {best['trial']}, validation "
              f"full-image mIoU {v:.4f}); no final fit: run `final --study {name}`")  # fmt: skip
        return
    t = best["test"]
    why = ("the warm start, kept: no lead over it was outside the validation noise"
           if best["validation"]["noise"].get("kept_warm_start") else "which chose it")  # fmt: skip
    print(f"best model: {best['model']}: test mIoU {t['miou']:.4f} on {t['images']} test images "
          f"(validation full-image mIoU {v:.4f}, {why}); config "
          f"{reports_dir(name)}/best.json")  # fmt: skip


def print_scores(scores: dict) -> None:
    for number, s in scores.items():
        print(f"trial {number}: validation patch mIoU {s['patch_miou']:.4f}, validation "
              f"full-image mIoU {s['miou']:.4f}")  # fmt: skip
