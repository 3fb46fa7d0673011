"""Mutation testing of the core modules against the fast unit layer: the score per module.

mutmut (3.x, requirements-dev.txt; configured in pyproject.toml's [tool.mutmut]) changes one
small thing at a time in the modules pyproject.toml names (segcore's metrics, stitched
inference, patches, augmentation table, data split and training loop; segsearch's space
validation, checkpoint keeping, worker loop, trial lifecycle, resume, storage and launcher), and
runs the tests of `pytest -m "not slow or mutation"` (the quick layer and the slow tests that
call the code in-process: test_launcher.py, test_worker.py) that reach the changed function, of
the module's own test files (MODULE_TESTS: a module is judged by its unit tests, not by every
test whose fixture happens to call it; the study-side fixture reaches space, data and storage,
which made each of their mutants run twenty seconds of lifecycle tests). A mutant the tests
fail on (or time out on) is killed; one they pass survives. Mutants that change no behaviour
are listed, with why, in tests/equivalent_mutants.txt and left out of the score. Not part of
CI (it takes a while).

    python tests/mutation.py            # run mutmut, then print the table (docs/testing.md)
    python tests/mutation.py --report   # only the table, from the last run's results
    python tests/mutation.py NAME ...   # run these mutants again (after new tests), then the table

Export TRAIN_OPTUNA_TEST_POSTGRES first (`.ci/postgres` prints it): the slot lock's PostgreSQL
test is skipped without it, and the lock's PostgreSQL branch survives.

A test process that hangs or loops is stopped and counts as a timeout (stop_stuck_mutants).
mutmut picks a mutant's tests by the calls it saw in the test process, so a function that runs
only in a forked child, or that only another module's test file reaches, has "no tests"
(TESTS_ELSEWHERE): its mutants are run here against those tests, the same way (mutmut's name in
MUTANT_UNDER_TEST, the mutants' copy of the code).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EQUIVALENT = ROOT / "tests" / "equivalent_mutants.txt"
KILLED = {1, 3, 36, -24, 24, 152, 255, -11, -9}  # test failure, internal error, timeout, crash
SURVIVED = {0, 5, 33}  # tests passed; no test reached it
# module -> its test files (tests/); a module not listed keeps every test that reaches it
MODULE_TESTS = {
    "segcore.metrics": ["test_metrics.py", "test_infer.py", "test_promote.py"],
    "segcore.infer": ["test_infer.py"],
    "segcore.patches": ["test_patches.py", "test_train.py"],
    "segcore.augment": ["test_augment.py"],
    "segcore.data": ["test_data.py", "test_reading.py", "test_bad_input.py"],
    "segcore.split": ["test_data.py", "test_bad_input.py"],
    "segcore.train": ["test_train.py"],
    "segsearch.space": ["test_space.py", "test_plan.py", "test_promote.py", "test_bad_input.py"],
    "segsearch.distributions": ["test_space.py", "test_bad_input.py"],
    "segsearch.checkpoints": ["test_study_side.py", "test_promote.py"],
    "segsearch.worker": ["test_worker.py"],
    "segsearch.lifecycle": ["test_study_side.py"],
    "segsearch.resume": ["test_study_side.py"],
    "segsearch.storage": ["test_study_side.py", "test_bad_input.py"],
    "segsearch.launcher": ["test_launcher.py"],
}
# functions mutmut cannot pair with their tests -> those tests: run only in a forked child
# (run_command), or reached only from another module's test file (the real fork server)
TESTS_ELSEWHERE = {
    "segsearch.launcher.x_fork_server": [
        "tests/test_plan.py::test_check_prints_the_planned_space_for_a_data_folder",
    ],
    "segsearch.launcher.x_run_command": [
        "tests/test_launcher.py::test_run_command_runs_a_script_as_a_new_process_would",
        "tests/test_launcher.py::test_a_launch_runs_its_workers_until_the_budget_is_met",
    ],
}


def equivalent() -> dict[str, str]:
    """mutant name -> why it changes no behaviour."""
    if not EQUIVALENT.exists():
        return {}
    out = {}
    for line in EQUIVALENT.read_text().splitlines():
        name, _, why = line.partition("#")
        if name.strip():
            out[name.strip()] = why.strip()
    return out


def results() -> dict[str, dict[str, int | None]]:
    """module file -> {mutant name: exit code}, from mutmut's result files."""
    out = {}
    for package in ("segcore", "segsearch"):
        for meta in sorted((ROOT / "mutants" / package).glob("*.py.meta")):
            data = json.loads(meta.read_text())
            out[f"{package}/{meta.name.removesuffix('.meta')}"] = data.get("exit_code_by_key", {})
    return out


def report() -> int:
    skip = equivalent()
    rows, survivors, worst = [], [], 1.0
    for module, codes in results().items():
        count = Counter()
        for name, code in codes.items():
            if name in skip:
                count["equivalent"] += 1
            elif code in KILLED:
                count["killed"] += 1
            elif code in SURVIVED:
                count["survived"] += 1
                survivors.append(name)
            else:
                count["other"] += 1  # not checked, suspicious, skipped
        judged = count["killed"] + count["survived"]
        score = count["killed"] / judged if judged else None  # none run yet: no score
        worst = min(worst, score if score is not None else 0.0)
        rows.append((module, len(codes), count, score))
    print("| module | mutants | killed | survived | equivalent | not judged | score |")
    print("|---|---|---|---|---|---|---|")
    for module, total, c, score in rows:
        print(f"| {module} | {total} | {c['killed']} | {c['survived']} | "
              f"{c['equivalent']} | {c['other']} | "
              f"{'-' if score is None else format(score, '.0%')} |")  # fmt: skip
    if survivors:
        print("\nsurvivors (not listed as equivalent):")
        for name in survivors:
            print(f"  {name}")
    return 0 if worst >= 0.85 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", action="store_true", help="only print the last run's table")
    parser.add_argument("--mutmut", action="store_true", help=argparse.SUPPRESS)  # the run itself
    parser.add_argument("names", nargs="*", help="mutants to run again (mutmut's names)")
    args = parser.parse_args()
    if args.mutmut:
        return run_mutmut(args.names)
    if not args.report:
        run = subprocess.Popen([sys.executable, __file__, "--mutmut", *args.names], cwd=ROOT)
        while run.poll() is None:
            stop_stuck_mutants()
            time.sleep(10)
        run_tests_elsewhere(set(args.names))
    return report()


def run_mutmut(names: list[str]) -> int:
    """`mutmut run` with each function's tests narrowed to its module's MODULE_TESTS once
    mutmut has collected (or loaded) which tests reach which function, and handed to pytest
    shortest first, so that a mutant the unit tests kill is killed in seconds (pytest -x)."""
    import mutmut.__main__ as mutmut

    collect = mutmut.collect_or_load_stats

    class ShortestFirst(set):
        def __iter__(self):
            took = mutmut.state().duration_by_test
            return iter(sorted(set.__iter__(self), key=lambda test: (took.get(test, 0), test)))

    def collect_then_narrow(*args, **kwargs) -> None:
        collect(*args, **kwargs)
        tests_of = mutmut.state().tests_by_mangled_function_name
        for function, tests in list(tests_of.items()):
            files = MODULE_TESTS.get(function.rpartition(".")[0])
            if files:
                tests = {t for t in tests if t.partition("::")[0].removeprefix("tests/") in files}
            tests_of[function] = ShortestFirst(tests)

    mutmut.collect_or_load_stats = collect_then_narrow
    return mutmut.cli(["run", "--max-children", "2", *names], standalone_mode=False) or 0


def run_tests_elsewhere(names: set[str]) -> None:
    """TESTS_ELSEWHERE's mutants that mutmut found no tests for (or `names`), against those tests,
    after a clean run of the same tests (a failing setup would otherwise kill every mutant)."""

    def exit_status(tests: list[str], mutant: str) -> int:
        env = {**os.environ, "MUTANT_UNDER_TEST": mutant}
        command = [sys.executable, "-m", "pytest", "-x", "-n", "0", "-q", "-p", "no:cacheprovider"]
        run = subprocess.run([*command, *tests], cwd=ROOT / "mutants", env=env, check=False,
                             capture_output=True, timeout=300)  # fmt: skip
        return run.returncode

    clean = set()
    for module, codes in results().items():
        meta = ROOT / "mutants" / f"{module}.meta"
        data, changed = json.loads(meta.read_text()), False
        for name, code in codes.items():
            tests = TESTS_ELSEWHERE.get(name.partition("__mutmut_")[0])
            if not tests or (code not in (None, 33) and name not in names):
                continue
            if tuple(tests) not in clean:
                if exit_status(tests, "") != 0:
                    sys.exit(f"the tests of {name} fail without a mutant: {tests}")
                clean.add(tuple(tests))
            data["exit_code_by_key"][name], changed = exit_status(tests, name), True
            killed = data["exit_code_by_key"][name] in KILLED
            print(f"{name}: {'killed' if killed else 'survived'}", flush=True)
        if changed:
            meta.write_text(json.dumps(data))


def stop_stuck_mutants(hung_s: int = 120, longest_s: int = 300) -> None:
    """mutmut limits a mutant's tests by CPU time (30 times their time in the stats run), so a
    mutant whose tests block (a worker process that is never joined: seen with mutants of
    patches.train_batches) never reaches the limit, and an endless loop (fit_depth counting up)
    reaches it only after half an hour. Kill the test process of a mutant that has used under
    20 % of a core for over `hung_s` seconds, or run for over `longest_s` (the whole quick
    layer takes about a minute of CPU): mutmut records it as killed by a signal, a timeout."""
    ps = subprocess.run(["ps", "-eo", "pid=,etimes=,pcpu=,args="], capture_output=True,
                        text=True, check=True)  # fmt: skip
    for line in ps.stdout.splitlines():
        pid, elapsed, cpu, *command = line.split()
        stuck = (int(elapsed) > hung_s and float(cpu) < 20) or int(elapsed) > longest_s
        if command[:1] == ["mutmut:"] and stuck:  # a test process (the runner is "python3 ...")
            print(f"\nstopping {command[1]}: {elapsed} s at {cpu} % CPU", flush=True)
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
