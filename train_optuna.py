#!/usr/bin/env python
"""train_optuna: hyperparameter search for U-Net segmentation. One entry point, subcommands.

Handlers return exit codes; a UserError (bad file, value or option) prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import traceback
from pathlib import Path

from segcore.errors import UserError
from segsearch.search import (
    AUTO,
    check_timeout,
    fingerprint_of,
    hand_over,
    prepare_study,
    print_final,
    print_scores,
    search_device,
    study_args,
    where_text,
    worker_slots,
)


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {self.prog}: {message}\n")


def seed_value(text: str) -> int:
    """--seed: numpy and optuna take seeds from 0 to 2**32 - 1."""
    try:
        seed = int(text)
    except ValueError:
        seed = -1
    if not 0 <= seed < 2**32:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to {2**32 - 1}, got {text!r}")
    return seed


def load_data(folder: str | None):
    """A labelled folder, or (saying so) the default synthetic data set."""
    from segcore.data import DEFAULT_SYNTHETIC, dataset_from

    if folder is None:
        n, seed = DEFAULT_SYNTHETIC
        print(f"note: no --data given; using {n} synthetic images (seed {seed})", file=sys.stderr)
    return dataset_from(folder)


def cmd_data(args) -> int:
    from segcore.files import check_output
    from segcore.synthetic import write_synthetic

    if args.n < 1:
        raise UserError(f"--n: must be at least 1, got {args.n}")
    if min(args.height, args.width) < 16:
        raise UserError(f"--height/--width: must be at least 16, got {args.height}x{args.width}")
    check_output(args.out, "--out", folder=True)
    write_synthetic(args.out, args.n, args.seed, args.height, args.width)
    print(f"wrote {args.n} images and masks to {args.out} (seed {args.seed})")
    return 0


def cmd_train(args) -> int:
    import os

    import torch

    from segcore.config import TrialConfig, read_record
    from segcore.data import load_folder
    from segcore.device import PRECISION_ENV, pick_device, precision_for
    from segcore.files import check_output
    from segcore.fit import fit
    from segcore.split import check_test_data, split_dataset

    cfg = TrialConfig.load(args.config)
    if args.epochs is not None:
        cfg = TrialConfig.from_dict({**cfg.to_dict(), "epochs": args.epochs}, "--epochs")
    check_output(args.out, "--out")
    device = pick_device(args.device)
    record = read_record(args.config)  # an exported best.json: its data, split and threads
    data = args.data or record.get("data")
    test_data = args.test_data or record.get("test_data")
    if record.get("threads") and device.type == "cpu":
        torch.set_num_threads(record["threads"])  # CPU results depend on the thread count
    if record.get("precision") and PRECISION_ENV not in os.environ:
        if record["precision"] != precision_for(device):  # CPU results depend on it too
            print(f"note: computing in {record['precision']}, as {args.config} records, not "
                  f"{precision_for(device)}", file=sys.stderr)  # fmt: skip
        os.environ[PRECISION_ENV] = record["precision"]
    if data and not args.data:
        print(f"note: no --data given; using {data} from {args.config}", file=sys.stderr)
    dataset = load_data(data)
    test = None
    if test_data:
        test = load_folder(test_data, dataset.labels)
        check_test_data(dataset, test, "--test-data" if args.test_data else str(args.config))
    splits = split_dataset(dataset, cfg, test)
    if record.get("split") and record["split"] != splits.names():
        print(f"note: these images split differently from {args.config}'s split; its test mIoU "
              f"is not comparable with this one", file=sys.stderr)  # fmt: skip
    print(f"images: {len(splits.train.names)} train, {len(splits.val.names)} validation, "
          f"{len(splits.test.names)} test; training on {cfg.train_on}", file=sys.stderr)  # fmt: skip
    sources = {"data": str(Path(data).resolve()) if data else None,
               "test_data": str(Path(test_data).resolve()) if test_data else None}  # fmt: skip
    done = fit(cfg, splits, args.out, sources=sources, device=device, progress=not args.quiet)
    patch = done["validation_patch_miou"]
    chosen = "" if patch is None else f" (best validation patch mIoU {patch:.4f})"
    test = done["test"]
    print(f"saved {args.out}: kept epoch {done['kept_epoch'] + 1}/{cfg.epochs}{chosen}; "
          f"test mIoU {test['miou']:.4f} on {test['images']} test images")  # fmt: skip
    return 0


def cmd_evaluate(args) -> int:
    from segcore.files import model_and_images
    from segcore.infer import evaluate

    model, meta, dataset = model_and_images(args.model, args.device, args.data, args.split)
    if dataset.masks is None:
        raise UserError(f"{args.data}: evaluate needs masks (DIR/images and DIR/masks)")
    scores = evaluate(model, dataset, meta["config"], progress=not (args.quiet or args.json))
    if args.json:
        print(json.dumps({**scores, "split": args.split}))
    else:
        which = f"{args.split} " if args.split else ""
        print(f"{which}mIoU {scores['miou']:.4f} over {scores['images']} images")
        for name, iou in scores["per_class"].items():
            print(f"  {name:>16}: " + ("absent" if iou is None else f"{iou:.4f}"))
    return 0


def cmd_predict(args) -> int:
    from segcore.files import check_output, model_and_images
    from segcore.infer import stitched
    from segcore.pictures import prediction_panel, write_prediction
    from segcore.progress import progress

    check_output(args.out, "--out", folder=True)
    model, meta, dataset = model_and_images(args.model, args.device, args.images)
    cfg, palette, classes = meta["config"], meta["palette"], meta["classes"]
    out = Path(args.out)
    n = len(dataset.images)
    each = enumerate(stitched(model, dataset.images, cfg))
    for i, probs in progress(each, n, "predict", "images", enabled=not args.quiet):
        image, name, probs = dataset.images[i], dataset.names[i], probs.cpu().numpy()
        write_prediction(out, name, probs, palette, args.masks, args.probabilities)
        truth = dataset.masks[i] if dataset.masks is not None else None
        prediction_panel(out / f"{name}_overlay.png", image, probs, classes, palette, truth,
                         title=f"{name} ({args.model})")  # fmt: skip
    kinds = {"png": "colour PNG", "tiff": "class-index TIFF"}
    extra = "" if args.probabilities == "none" else f", probabilities ({args.probabilities})"
    print(f"wrote {len(dataset.images)} masks ({kinds[args.masks]}){extra} and overlays to {out}")
    return 0


def cmd_check(args) -> int:
    from segsearch.space import largest_patch, load_space

    if args.space is None and args.data is None:
        raise UserError("check: give --space FILE, --data DIR or both")
    if args.space == AUTO:  # print the space `search --space auto` would plan here
        from segsearch.launcher import device_kind, parse_gpus
        from segsearch.plan import space_text

        kind = device_kind(parse_gpus(args.gpus))
        print(space_text(fingerprint_of(args.data), kind, args.data or "synthetic data"), end="")
        return 0
    space = None
    if args.space is not None:
        space = load_space(args.space)
        print(f"{args.space}: ok ({len(space.search)} searched fields, {space.n_trials} trials, "
              f"sampler {space.sampler['name']}, pruner {space.pruner['name']})")  # fmt: skip
    if args.data is not None:
        from segcore.data import load_folder
        from segcore.fingerprint import describe, fingerprint

        fp = fingerprint(load_folder(args.data), space and largest_patch(space))
        print(describe(fp, args.data))
    return 0


def cmd_search(args) -> int:
    from segsearch.launcher import Launcher, check_installed

    check_installed()

    n_workers, gpus = worker_slots(args)
    where = where_text(gpus, n_workers)
    name, url, space = prepare_study(args, f"{n_workers} workers {where}", on_gpus=bool(gpus))
    timeout = args.timeout if args.timeout is not None else space.timeout
    code = Launcher(name, url, n_workers, gpus, args.quiet, seed=args.seed,
                    timeout=timeout).run()  # fmt: skip
    if code or args.no_rescore:
        return code
    return cmd_finish(args)


def cmd_finish(args) -> int:
    """Rescoring, the promotion stage and the final fit (unless --no-final), export, the report,
    the last lines."""
    from segsearch.final import export
    from segsearch.rescore import score

    name, url = study_args(args)
    workers = worker_slots(args)
    device = search_device(workers[1])
    print_scores(score(name, url, progress=not args.quiet, device=device))
    best = json.loads(export(name, url).read_text())
    print(f"best at the trial budget: trial {best['trial']}, validation full-image mIoU "
          f"{best['validation']['full_image_miou']:.4f}")  # fmt: skip
    if not args.no_final:
        hand_over(args, name, url, workers)
    cmd_report(args)
    print_final(name, url)
    return 0


def cmd_slurm(args) -> int:
    import numpy as np

    from segsearch.slurm import submit
    from segsearch.storage import sqlite_path
    from segsearch.study import open_study

    if not 1 <= args.workers <= 10_000:
        raise UserError(f"--workers: array tasks, from 1 to 10000, got {args.workers}")
    if args.cpus_per_worker < 1 or args.gpus_per_worker < 0:
        raise UserError("--cpus-per-worker: at least 1; --gpus-per-worker: at least 0")
    kind = f"{args.gpus_per_worker} GPU(s) and " if args.gpus_per_worker else ""
    name, url, space = prepare_study(
        args,
        f"a SLURM array of {args.workers} workers ({kind}{args.cpus_per_worker} CPU(s) each)",
        on_gpus=args.gpus_per_worker > 0,
    )
    if sqlite_path(url) is not None:
        print("note: SQLite storage: every task must run on this node's file system; across "
              "nodes use PostgreSQL (--storage)", file=sys.stderr)  # fmt: skip
    timeout = args.timeout if args.timeout is not None else space.timeout
    study, _ = open_study(name, url)
    seed = int(np.random.SeedSequence([len(study.trials)]).generate_state(1)[0] >> 2)  # fresh
    workers_sh, finish_sh, array, last = submit(
        name, url, workers=args.workers, cpus=args.cpus_per_worker, gpus=args.gpus_per_worker,
        options=args.sbatch_option or [], seed=seed, timeout=timeout, final=not args.no_final,
        dry_run=args.dry_run,
    )  # fmt: skip
    if args.dry_run:
        print(f"wrote {workers_sh} and {finish_sh} (not submitted: --dry-run)")
        return 0
    print(f"submitted job array {array} ({args.workers} workers, {workers_sh}) and job {last} "
          f"(rescoring, final fit, report when the array ends: {finish_sh}); watch with "
          f"`squeue -j {array},{last}`; logs in storage/{name}/slurm/")  # fmt: skip
    return 0


def cmd_final(args) -> int:
    name, url = study_args(args)
    hand_over(args, name, url, worker_slots(args))
    print_final(name, url)
    return 0


def cmd_report(args) -> int:
    from segsearch.report import write_report
    from segsearch.study import open_study, reports_dir

    name, url = study_args(args)
    study, space = open_study(name, url)
    index = write_report(study, space, reports_dir(name), progress=not args.quiet)
    print(f"wrote {index}")
    return 0


def cmd_dashboard(args) -> int:
    import errno
    import socket
    import threading

    from optuna_dashboard import run_server

    from segsearch.artifacts import open_store
    from segsearch.storage import mask_url, open_storage
    from segsearch.study import load_study

    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port}: must be between 1 and 65535")
    name, url = study_args(args)
    storage = open_storage(url)
    study, _ = load_study(name, storage, seed=None)  # a clear error for a study not there
    try:  # say clearly when the port is taken, before the server thread would die of it
        with socket.create_server((args.host, args.port)):
            pass
    except OSError as e:
        reason = str(e.strerror).split(" (while")[0]  # create_server appends the address
        if e.errno in (errno.EADDRINUSE, errno.EACCES):
            raise UserError(
                f"--port {args.port}: cannot listen on {args.host} ({reason})"
            ) from None
        raise UserError(f"--host {args.host}: cannot listen there ({reason})") from None
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: --host {args.host}: optuna-dashboard has no authentication and can "
              f"change the study; anyone who can reach this address can", file=sys.stderr)  # fmt: skip
    store = open_store(study)
    print(f"dashboard of study {name} ({mask_url(url)}): http://{args.host}:{args.port}/ "
          f"(Ctrl-C stops it)", flush=True)  # fmt: skip
    # The server runs in a daemon thread: wsgiref swallows a KeyboardInterrupt that lands inside a
    # request, so Ctrl-C is taken here, in a main thread that only waits.
    server = threading.Thread(
        target=run_server, args=(storage,),
        kwargs={"host": args.host, "port": args.port, "artifact_store": store}, daemon=True,
    )  # fmt: skip
    server.start()
    try:
        while server.is_alive():
            server.join(0.5)
    except KeyboardInterrupt:
        pass
    print("dashboard stopped", file=sys.stderr)
    return 0


def as_launched() -> None:
    """In a process the launcher (or the promotion stage) started: die with it, and use the
    threads it gave; in a worker started by hand or by a SLURM array, the CPUs it may use."""
    import os

    import torch

    from segcore.device import usable_cpus
    from segsearch.launcher import die_with_launcher

    die_with_launcher()
    threads = os.environ.get("TRAIN_OPTUNA_THREADS")  # the launcher's share, or all it may use
    torch.set_num_threads(int(threads) if threads else usable_cpus())


def cmd_worker(args) -> int:
    from segcore.device import pick_device
    from segsearch.worker import run_worker

    as_launched()
    check_timeout(args.timeout)
    name, url = study_args(args)
    pick_device(args.device)
    return run_worker(name, url, args.seed, args.device, args.timeout)


def cmd_promote(args) -> int:
    """One finalist of the promotion stage (what `search` and `finish` start, one per worker)."""
    from segcore.device import pick_device
    from segsearch.promote import promote_one

    as_launched()
    name, url = study_args(args)
    done = promote_one(name, url, args.trial, pick_device(args.device), progress=not args.quiet)
    print(f"finalist trial {args.trial}: validation full-image mIoU "
          f"{done['validation']['miou']:.4f}")  # fmt: skip
    return 0


def cmd_score(args) -> int:
    from segsearch.rescore import score

    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top-k: must be at least 1, got {args.top_k}")
    name, url = study_args(args)
    print_scores(score(name, url, args.top_k, progress=not args.quiet, device=args.device))
    return 0


def cmd_export(args) -> int:
    from segcore.files import check_output
    from segsearch.final import export

    name, url = study_args(args)
    if args.out:
        check_output(args.out, "--out")
    if args.model:
        check_output(args.model, "--model")
    print(f"wrote {export(name, url, args.out, args.model)}")
    if args.model:
        print(f"wrote {args.model} (the winner trial's own checkpoint, not the final fit)")
    return 0


def build_parser() -> Parser:
    parser = Parser(prog="train_optuna.py", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    def device_option(p):
        p.add_argument("--device", default="auto",
                       help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")  # fmt: skip

    p = sub.add_parser("data", help="write a synthetic data set in the folder format")
    p.add_argument("--out", required=True, help="new folder to write DIR/images, DIR/masks")
    p.add_argument("--n", type=int, default=100, help="number of images (default 100)")
    p.add_argument("--seed", type=seed_value, default=0, help="generator seed (default 0)")
    p.add_argument("--height", type=int, default=400, help="image height (default 400)")
    p.add_argument("--width", type=int, default=200, help="image width (default 200)")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("train", help="train one configuration, score its test images, save it")
    p.add_argument("--config", required=True, help="config JSON or exported best-config JSON")
    p.add_argument("--data", help="labelled data folder (default: best.json's, else synthetic)")
    p.add_argument("--test-data", help="labelled folder of test images (default: split off)")
    p.add_argument("--out", required=True, help="model file to write (MODEL.pt)")
    p.add_argument("--epochs", type=int, help="override the config's epochs")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    device_option(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="full-image stitched mIoU on a labelled folder")
    p.add_argument("--model", required=True, help="model file from train")
    p.add_argument("--data", help="labelled data folder (default: 20 synthetic images, seed 1)")
    p.add_argument("--split", choices=("train", "validation", "test"),
                   help="only this part of the model's split (default --data: the model's)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    device_option(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="label masks and overlay pictures for a folder of images")
    p.add_argument("--model", required=True, help="model file from train")
    p.add_argument("--images", required=True, help="folder of images, or a data folder")
    p.add_argument("--out", required=True, help="folder for NAME.png masks and overlays")
    p.add_argument("--masks", choices=("png", "tiff"), default="png",
                   help="png: colours of the model's palette (default); tiff: class indices, "
                        "uint8 (uint16 past 256 classes), for Fiji and napari")  # fmt: skip
    p.add_argument("--probabilities", choices=("none", "tiff", "npy"), default="none",
                   help="also per-class probabilities (K, H, W) float16: NAME_probs.tif/.npy")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    device_option(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("check", help="validate a search space, fingerprint a data folder")
    p.add_argument("--space", help="search-space YAML to validate, or auto: print the space "
                   "`search --space auto` plans from --data on this machine")  # fmt: skip
    p.add_argument("--data", help="data folder: read every file, print what it holds")
    p.add_argument("--gpus", default="auto",
                   help="with --space auto: plan for the trials on these GPUs, as search's --gpus "
                   "(default auto: every visible GPU, the CPU without one)")  # fmt: skip
    p.set_defaults(func=cmd_check)

    def study_options(p, storage_help="SQLAlchemy URL (default sqlite:///storage/NAME.db)"):
        p.add_argument("--study", required=True, help="study name (letters, digits, _ - .)")
        p.add_argument("--storage", help=storage_help + "; or set $TRAIN_OPTUNA_STORAGE")
        p.add_argument("--quiet", action="store_true", help="no progress output")
        p.add_argument("--verbose", action="store_true", help="optuna's own log lines too")

    def new_study_options(p):
        p.add_argument(
            "--space",
            required=True,
            help="search-space YAML (search_spaces/quick.yaml), or auto: "
            "planned from --data and this machine, written to reports/NAME/space.yaml",
        )
        study_options(p)
        p.add_argument("--data", help="labelled data folder (default: synthetic, seed 0)")
        p.add_argument("--artifacts",
                       help="the study's folder for checkpoints, the decode cache and logs, "
                            "recorded when it is created (default: beside the SQLite file, "
                            "DIR/NAME for DIR/NAME.db; with PostgreSQL storage/NAME here: give "
                            "a shared folder for many machines)")  # fmt: skip
        p.add_argument("--test-data", help="labelled folder of test images (default: split off)")
        p.add_argument("--n-trials", type=int, help="study-wide budget (default: the space's)")
        p.add_argument("--timeout", type=float,
                       help="seconds: no trial starts after it, running ones stop at an epoch's "
                            "end and resume next time; then rescoring and the final fit "
                            "(default: the space's study.timeout, else none)")  # fmt: skip
        p.add_argument("--no-final", action="store_true",
                       help="no final fit: best.json only, no best.pt")  # fmt: skip
        device_option(p)

    def worker_options(p):
        p.add_argument("--workers", type=int,
                       help="worker processes (default: GPUs x --workers-per-gpu, or 2 on the "
                            "CPU); the promotion stage trains as many finalists at once")  # fmt: skip
        p.add_argument("--gpus", default="auto",
                       help="auto (default: every visible GPU, the CPU without one), none (the CPU) "
                            "or a list like 0,1")  # fmt: skip
        p.add_argument("--workers-per-gpu", type=int, default=1, help="workers per GPU (default 1)")

    p = sub.add_parser("search", help="create or resume a study, run it to budget, rescore, export")
    new_study_options(p)
    worker_options(p)
    p.add_argument("--seed", type=seed_value, default=0,
                   help="seeds the workers' samplers (default 0): another seed, another search "
                        "on the same split")  # fmt: skip
    p.add_argument(
        "--no-rescore", action="store_true",
        help="stop when the budget is met; run `finish` (or score, export, final, report) later",
    )  # fmt: skip
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("slurm", help="run the search as a SLURM job array, then finish it")
    new_study_options(p)
    p.add_argument("--workers", type=int, default=4, help="array tasks, one worker each (4)")
    p.add_argument("--cpus-per-worker", type=int, default=2, help="CPUs per task (default 2)")
    p.add_argument("--gpus-per-worker", type=int, default=0,
                   help="GPUs per task: 1 on a GPU partition (--gres=gpu:1); default 0")  # fmt: skip
    p.add_argument("--sbatch-option", action="append", metavar="OPT",
                   help="passed to sbatch in both scripts, e.g. --sbatch-option=--partition=gpu "
                        "(repeat for more)")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="write the job scripts, submit nothing")
    p.set_defaults(func=cmd_slurm)

    p = sub.add_parser("finish", help="rescore, promote, final fit, export, report a study")
    study_options(p)
    p.add_argument("--no-final", action="store_true", help="no promotion stage, no final fit")
    worker_options(p)
    device_option(p)
    p.set_defaults(func=cmd_finish)

    p = sub.add_parser("promote", help="train one finalist of the promotion stage")
    study_options(p)
    p.add_argument("--trial", type=int, required=True, help="the finalist's trial number")
    device_option(p)
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("worker", help="join a study from another shell or machine")
    study_options(p)
    p.add_argument("--seed", type=seed_value, help="sampler seed (default: none)")
    p.add_argument("--timeout", type=float,
                   help="seconds: no trial starts after it, the running one stops at an epoch's "
                        "end (to resume later)")  # fmt: skip
    device_option(p)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("score", help="full-image stitched rescoring of the best trials")
    study_options(p)
    p.add_argument("--top-k", type=int, help="how many trials (default: the space's top_k)")
    device_option(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("report", help="plots, top-trials table, prediction panels, index.html")
    study_options(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("dashboard", help="optuna-dashboard on this study and its artifacts")
    study_options(p)
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("final", help="promote the finalists, fit the winner, score it on test")
    study_options(p)
    worker_options(p)
    device_option(p)
    p.set_defaults(func=cmd_final)

    p = sub.add_parser("export", help="best-config JSON of the winner (best validation mIoU)")
    study_options(p)
    p.add_argument("--out", help="file to write (default reports/NAME/best.json)")
    p.add_argument("--model", help="also write the winner trial's own checkpoint as a model file")
    p.set_defaults(func=cmd_export)
    return parser


def quiet_optuna(verbose: bool) -> None:
    """Heartbeat and artifacts are marked experimental; say so once here, not on every run."""
    import warnings

    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.INFO if verbose else optuna.logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    for ours in ("segcore", "segsearch"):  # our epoch and trial lines; not matplotlib's chatter
        logging.getLogger(ours).setLevel(logging.INFO)
    quiet_optuna(verbose=args.command == "worker" or getattr(args, "verbose", False))
    # SIGTERM (a scheduler, `kill`) stops search and workers the way Ctrl-C does; SIGINT is
    # restored too, because a shell starts background jobs with it ignored
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return args.func(args)
    except UserError as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path the checks did not foresee: still one line naming the file
        if args.debug or not e.filename:
            raise
        print(f"error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    code = main()
    # the OS frees everything at exit: collecting a torch-sized heap first costs ~0.5 s a process,
    # and sixteen workers finishing together on two cores wait for each other's collections
    import gc

    gc.freeze()
    sys.exit(code)
