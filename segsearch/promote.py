"""The promotion stage: the finalists trained at the budget the product is trained at, before
one of them is handed over.

Trials run at a fraction of the final budget (quick.yaml: 20 s against the final fit's 520 s). That
ranks configurations well enough to find candidates, not to rank the candidates: their margins
on whole validation images at the trial budget are often smaller than the validation set's noise
(the same quick search on `shapes` handed over the recipe once, and a model 0.006 test mIoU
better the next time). So the best `study.finalists` rescored trials, the warm start (the
recipe) always among them, are each trained with the final config (the space's `final:`) on the
training images, keeping the epoch of best validation patch mIoU, and scored on whole
validation images at that budget; the winner is the best of them there (segsearch.final).

Each finalist is a model file, reports/NAME/finalists/trial-N.pt. A finalist stopped before its
end (Ctrl-C, a time limit, a killed job) resumes from its per-epoch state, trial-N.state.pt; one
already trained is not trained again. The finalists train in parallel, one per worker process
(pinned to its GPU, as the search's workers are), each a `promote --trial N` command.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import optuna
import torch

from segcore.budget import same_request
from segcore.config import TrialConfig
from segcore.device import usable_cpus
from segcore.errors import UserError
from segcore.files import write_text
from segcore.fit import fit
from segcore.metrics import bootstrap_miou
from segsearch.artifacts import study_folder
from segsearch.checkpoints import WARM_START
from segsearch.space import Space, final_config
from segsearch.study import open_study, reports_dir, study_splits


def ranked(scores: dict[str, dict]) -> list[str]:
    """Trial numbers (the scores' keys) by validation full-image mIoU, best first; ties: the
    earlier trial. The one rule for the winner, the finalists, the ensemble and the report."""
    return sorted(scores, key=lambda n: (-scores[n]["miou"], int(n)))


def finalist_numbers(study: optuna.Study, space: Space) -> list[int]:
    """The best `space.finalists` rescored trials by validation full-image mIoU, the warm start
    counted among them whatever its rank (ties: the earlier trial)."""
    if space.finalists == 0:
        return []
    scores = study.user_attrs.get("full_image_scores") or {}
    order = ranked(scores)
    warm = [n for n in order if study.trials[int(n)].user_attrs.get(WARM_START)]
    others = [n for n in order if n not in warm][: max(0, space.finalists - len(warm))]
    return sorted(int(n) for n in others + warm)


def promotion_config(study: optuna.Study, space: Space, number: int) -> TrialConfig:
    """What a finalist trains: its final config, with the space's `promote:` overrides (a
    smaller budget, say), on the training images only (the validation images choose its epoch
    and score it)."""
    cfg = final_config(TrialConfig.from_dict(study.trials[number].user_attrs["config"]), space)
    return TrialConfig.from_dict({**cfg.to_dict(), **space.promote, "train_on": "train"})


def budget_text(space: Space) -> str:
    """What the finalists train at, in words."""
    if not space.promote:
        return "the final budget"
    return "the promotion budget (" + ", ".join(f"{k} {v}" for k, v in space.promote.items()) + ")"


def finalist_path(name: str, number: int) -> Path:
    return reports_dir(name) / "finalists" / f"trial-{number}.pt"


def trained(study: optuna.Study, space: Space, number: int) -> dict | None:
    """A finalist's recorded figures if its model file holds its promotion config trained on
    the study's split (not a file left by an earlier study of the name), else None."""
    path = finalist_path(study.study_name, number)
    if not path.is_file():
        return None
    payload = torch.load(path, map_location="cpu", weights_only=True)
    same = same_request(promotion_config(study, space, number), payload["config"])
    return (
        payload["extra"]
        if same and payload["extra"]["split"] == study.user_attrs["split"]
        else None
    )


def promote_one(name: str, url: str, number: int, device: torch.device, progress: bool) -> dict:
    """Train finalist `number` (or resume it), score it on whole validation images; returns
    what its model file records."""
    study, space = open_study(name, url)
    if number not in finalist_numbers(study, space):
        raise UserError(f"--trial {number}: not a finalist of study {name!r}")
    done = trained(study, space, number)
    if done is not None:
        return done
    cfg = promotion_config(study, space, number)
    path = finalist_path(name, number)
    sources = {"data": study.user_attrs.get("data"), "test_data": study.user_attrs.get("test_data"),
               "study": name, "trial": number}  # fmt: skip
    return fit(cfg, study_splits(study, space), path, sources=sources, device=device,
               progress=progress, scored="validation", state=path.with_suffix(".state.pt"))  # fmt: skip


def with_interval(score: dict) -> dict:
    """`score` with the 95 % per-image bootstrap interval of its mIoU."""
    return {**score, "interval": list(bootstrap_miou(score["confusion"]))}


def promote(
    name: str, url: str, *, workers: int, gpus: list[int], device: str | None, quiet: bool
) -> dict[str, dict]:
    """The promotion stage: train the finalists not yet trained (in parallel, up to `workers`
    processes), then record every finalist's validation figures at that budget in the study
    ("promotion") and reports/NAME/promotion.json. Returns them by trial number."""
    study, space = open_study(name, url)
    numbers = finalist_numbers(study, space)
    todo = [n for n in numbers if trained(study, space, n) is None]
    if todo:
        print(f"promotion: training {len(todo)} of finalists {numbers} at {budget_text(space)} "
              f"({min(len(todo), workers)} at a time)", file=sys.stderr)  # fmt: skip
        run_finalists(name, url, todo, min(workers, len(todo)), gpus, device, quiet)
    scores = {}
    for n in numbers:
        extra = trained(study, space, n)
        if extra is None:
            raise UserError(f"--study {name}: finalist trial {n} has no model file; run again")
        scores[str(n)] = {
            "patch_miou": extra["validation_patch_miou"], "kept_epoch": extra["kept_epoch"],
            **with_interval(extra["validation"]),
        }  # fmt: skip
    study.set_user_attr("promotion", scores)
    write_text(reports_dir(name) / "promotion.json", json.dumps(scores, indent=2) + "\n")
    return scores


def run_finalists(
    name: str, url: str, numbers: list[int], parallel: int, gpus: list[int], device: str | None,
    quiet: bool,
) -> None:  # fmt: skip
    """`promote --trial N` for each of `numbers`, `parallel` at a time, as the search's workers
    run: forked from the fork server, pinned to a GPU, logs in the study's folder
    (storage/NAME/promote-N.log by default).
    Ctrl-C stops them all (each resumes from its last epoch next time)."""
    from segsearch import ENTRY
    from segsearch.launcher import PARENT_ENV, fork_server, run_command, worker_env
    from segsearch.storage import STORAGE_ENV

    if parallel <= 1 and not gpus:  # one at a time: here, no process to start
        from segcore.device import pick_device

        for n in numbers:
            promote_one(name, url, n, pick_device(device), progress=not quiet)
        return
    context, logs = fork_server(), study_folder(open_study(name, url)[0])
    logs.mkdir(parents=True, exist_ok=True)
    threads = max(1, usable_cpus() // parallel)
    waiting, running = list(numbers), {}
    started = shown = time.monotonic()
    try:
        while waiting or running:
            if not quiet and time.monotonic() - shown >= 30:
                shown = time.monotonic()
                where = ", ".join(f"trial {n} {last_epoch(log)}" for n, _, log in running.values())
                print(f"promotion: {where}; {len(waiting)} waiting; "
                      f"{time.monotonic() - started:.0f} s", file=sys.stderr)  # fmt: skip
            free = [i for i in range(parallel) if i not in running]
            while waiting and free:
                slot, n = free.pop(0), waiting.pop(0)
                env = {**worker_env(slot, gpus, threads), STORAGE_ENV: url,
                       PARENT_ENV: str(os.getpid())}  # fmt: skip
                argv = [str(ENTRY), "promote", "--study", name, "--trial", str(n), "--quiet",
                        "--device", device or "auto"]  # fmt: skip
                log = str((logs / f"promote-{n}.log").resolve())
                proc = context.Process(target=run_command, args=(argv, env, log))
                proc.start()
                running[slot] = (n, proc, log)
            for slot, (n, proc, log) in list(running.items()):
                if proc.exitcode is None:
                    continue
                del running[slot]
                if proc.exitcode:
                    raise UserError(f"--study {name}: the promotion of trial {n} stopped with "
                                    f"status {proc.exitcode}; see {log}")  # fmt: skip
            time.sleep(0.5)
    finally:  # Ctrl-C or a failed finalist: stop the others (they resume next time)
        for _, proc, _ in running.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGINT)
        for _, proc, _ in running.values():
            proc.join(timeout=30)
            if proc.exitcode is None:
                proc.kill()
                proc.join()


def last_epoch(log: str) -> str:
    """'epoch E/N' of the newest epoch line in a finalist's log, or 'starting'."""
    with contextlib.suppress(OSError):
        found = re.findall(r"^epoch (\d+/\d+)", Path(log).read_text(), re.MULTILINE)
        if found:
            return f"epoch {found[-1]}"
    return "starting"


# Fewer validation images than this, and the bootstrap's intervals are not trusted: 3 images have
# 10 distinct resamples, and on HeLa (3 validation images) a margin whose interval excluded 0
# (+0.0015, interval +0.0011 to +0.0021) reversed on the test images (-0.0027).
MIN_IMAGES = 8


def choice_noise(scores: dict[str, dict], winner: int, warm: int | None) -> dict:
    """How sure the choice of `winner` among `scores` (by trial number, each with its images'
    confusion matrices) is: its 95 % interval, and its margin over the runner-up and over the
    warm start with paired bootstrap intervals; `within_noise` when an interval holds 0."""
    best = scores[str(winner)]
    if any("confusion" not in s for s in scores.values()):  # scored before intervals existed
        return {}
    out: dict = {"interval": list(bootstrap_miou(best["confusion"]))}
    others = {"runner_up": next((int(n) for n in ranked(scores) if int(n) != winner), None),
              "warm_start": warm if warm != winner else None}  # fmt: skip
    for key, number in others.items():
        if number is None or str(number) not in scores:
            continue
        other = scores[str(number)]
        low, high = bootstrap_miou(best["confusion"], baseline=other["confusion"])
        out[key] = {"trial": number, "margin": best["miou"] - other["miou"],
                    "interval": [low, high], "within_noise": bool(low <= 0 <= high)}  # fmt: skip
    out["within_noise"] = any(out.get(k, {}).get("within_noise", False) for k in others)
    if len(best["confusion"]) < MIN_IMAGES:  # a bootstrap of a few images cannot show the noise
        out["too_few_images"] = len(best["confusion"])
        out["within_noise"] = True
    return out


def decide(scores: dict[str, dict], warm: int | None, promoted: bool) -> tuple[int, dict]:
    """The winner among `scores` (by trial number) and how sure the choice is (choice_noise, of
    the leader): the best by validation full-image mIoU (ties: the earlier trial); after the
    promotion stage, the warm start instead when the leader's margin over it is inside the
    validation noise or there are too few validation images to show the noise (then the noise
    is the warm start's, with `kept_warm_start`: the leader's number, margin and interval). A
    lead the validation images cannot show is a coin toss, and the warm start is the known
    configuration: on HeLa (3 validation frames) leads of +0.012 and +0.013 over the recipe's
    configuration after the 90-s promotion handed over -0.0072 and -0.0036 test mIoU against the
    recipe (docs/benchmarks.md)."""
    leader = int(ranked(scores)[0])
    noise = choice_noise(scores, leader, warm)
    unsure = noise.get("too_few_images") or noise.get("warm_start", {}).get("within_noise")
    if promoted and warm is not None and leader != warm and str(warm) in scores and unsure:
        kept = {k: v for k, v in choice_noise(scores, warm, None).items() if k != "runner_up"}
        lead = {k: noise["warm_start"][k] for k in ("margin", "interval")}
        return warm, {**kept, "within_noise": True, "kept_warm_start": {"trial": leader, **lead}}
    return leader, noise


def margin_text(noise: dict) -> str:
    """One sentence on how sure the choice is, for notes, the report and the CLI."""
    if noise.get("kept_warm_start"):
        m, why = noise["kept_warm_start"], "within the validation noise"
        if noise.get("too_few_images"):
            why = f"only {noise['too_few_images']} validation images, too few to show the noise"
        return (f"The warm start is handed over: trial {m['trial']} led it by "
                f"{m['margin']:+.4f} (95 % interval {m['interval'][0]:+.4f} to "
                f"{m['interval'][1]:+.4f}), {why}; a lead the validation images cannot "
                f"show is not taken (more validation images, or a larger val_fraction, let it "
                f"be).")  # fmt: skip
    parts = []
    for key, what in (("runner_up", "the runner-up"), ("warm_start", "the warm start")):
        if key in noise:
            m = noise[key]
            parts.append(f"{m['margin']:+.4f} over {what} (trial {m['trial']}; 95 % interval "
                         f"{m['interval'][0]:+.4f} to {m['interval'][1]:+.4f})")  # fmt: skip
    if not parts:
        return ""
    verdict = ("within the validation noise: another draw of validation images could reverse "
               "this choice" if noise["within_noise"] else "outside the validation noise")  # fmt: skip
    if noise.get("too_few_images"):
        verdict = (f"only {noise['too_few_images']} validation images, too few for the interval "
                   f"to show the noise: treat this choice as unsure")  # fmt: skip
    return f"Margin {'; '.join(parts)}: {verdict}."
