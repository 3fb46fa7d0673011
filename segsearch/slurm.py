"""SLURM as the cluster launcher: a job array of workers and a last job that finishes the search.

One array task is one `worker` of the study (a GPU each with --gpus-per-worker 1); tasks are
requeueable, and SIGTERM (preemption, scancel, the time limit) stops a task's trial at once,
which a worker then resumes from its last saved epoch. The finishing job depends on the whole
array (afterany) and runs `finish`: rescoring, export, the final fit and the report.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from segcore.errors import UserError
from segcore.files import write_text
from segsearch import ENTRY
from segsearch.storage import STORAGE_ENV


def folder(name: str) -> Path:
    return Path("storage") / name / "slurm"


def _header(job: str, log: str, cpus: int, gpus: int, options: list[str]) -> list[str]:
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job}", f"#SBATCH --output={log}",
             "#SBATCH --open-mode=append", f"#SBATCH --chdir={Path.cwd()}",
             f"#SBATCH --cpus-per-task={cpus}"]  # fmt: skip
    if gpus:
        lines.append(f"#SBATCH --gres=gpu:{gpus}")
    return lines + [f"#SBATCH {option}" for option in options]


def worker_script(
    name: str, workers: int, cpus: int, gpus: int, options: list[str], seed: int,
    timeout: float | None,
) -> str:  # fmt: skip
    """The array job: one worker per task, each with a sampler seed of its own (task, restart)."""
    lines = _header(f"{name}-workers", str(folder(name) / "worker-%a.log"), cpus, gpus, options)
    lines += [f"#SBATCH --array=0-{workers - 1}", "#SBATCH --requeue", "",
              "# One worker of the study. SIGTERM (preemption, scancel, the time limit) stops its",
              "# trial at once; a worker resumes it from its last saved epoch. `exec`: SLURM's",
              "# signals reach Python itself, not a shell that would die first.",
              "export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK TRAIN_OPTUNA_THREADS=$SLURM_CPUS_PER_TASK",
              f"seed=$(( {seed} + SLURM_ARRAY_TASK_ID * 1000 + ${{SLURM_RESTART_COUNT:-0}} ))"]  # fmt: skip
    command = [sys.executable, str(ENTRY), "worker", "--study", name]
    if timeout is not None:
        command += ["--timeout", f"{timeout:.0f}"]
    lines.append("exec " + shlex.join(command) + ' --seed "$seed"')
    return "\n".join(lines) + "\n"


def finish_script(name: str, cpus: int, gpus: int, options: list[str], final: bool) -> str:
    """The last job: rescoring, the promotion stage and the final fit (unless not `final`),
    export, the report. The finalists train one after another on the job's own CPUs or GPU."""
    lines = _header(f"{name}-finish", str(folder(name) / "finish.log"), cpus, gpus, options)
    command = [sys.executable, str(ENTRY), "finish", "--study", name, "--quiet", "--workers", "1"]
    if gpus:
        command += ["--gpus", "all"]
    if not final:
        command.append("--no-final")
    lines += ["", f"export OMP_NUM_THREADS={cpus}", "exec " + shlex.join(command)]
    return "\n".join(lines) + "\n"


def sbatch(script: Path, url: str, dependency: str | None = None) -> str:
    """Submit; returns the job id. The storage URL reaches the jobs in their environment (sbatch
    passes the submitter's), never in a script or on a command line."""
    command = ["sbatch", "--parsable"]
    if dependency:
        command.append(f"--dependency=afterany:{dependency}")
    env = {**os.environ, STORAGE_ENV: url}
    try:
        out = subprocess.run([*command, str(script)], capture_output=True, text=True, env=env,
                             check=False, timeout=60)  # fmt: skip
    except FileNotFoundError:
        raise UserError("slurm: sbatch not found; is this a SLURM submit host?") from None
    if out.returncode:
        reason = (out.stderr.strip().splitlines() or ["no message"])[-1]
        raise UserError(f"slurm: sbatch refused {script} ({reason})")
    return out.stdout.strip().split(";")[0]


def submit(
    name: str, url: str, *, workers: int, cpus: int, gpus: int, options: list[str], seed: int,
    timeout: float | None, final: bool, dry_run: bool,
) -> tuple[Path, Path, str | None, str | None]:  # fmt: skip
    """Write both job scripts under storage/NAME/slurm/ and submit them (unless dry_run);
    returns (worker script, finish script, array job id, finish job id)."""
    workers_sh, finish_sh = folder(name) / "workers.sbatch", folder(name) / "finish.sbatch"
    write_text(workers_sh, worker_script(name, workers, cpus, gpus, options, seed, timeout))
    write_text(finish_sh, finish_script(name, cpus, gpus, options, final))
    if dry_run:
        return workers_sh, finish_sh, None, None
    array = sbatch(workers_sh, url)
    return workers_sh, finish_sh, array, sbatch(finish_sh, url, dependency=array)
