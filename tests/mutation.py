"""Mutation testing of the core modules against the fast unit layer: the score per module.

mutmut (3.x, requirements-dev.txt; configured in pyproject.toml's [tool.mutmut]) changes one
small thing at a time in segcore's metrics, stitched inference, patches, augmentation table,
space validation, checkpoint keeping and data split, and runs the tests of `pytest -m "not
slow"` that reach the changed function. A mutant the tests fail on (or time out on) is killed;
one they pass survives. Mutants that change no behaviour are listed, with why, in
tests/equivalent_mutants.txt and left out of the score. Not part of CI (it takes a while).

    python tests/mutation.py            # run mutmut, then print the table (docs/testing.md)
    python tests/mutation.py --report   # only the table, from the last run's results
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EQUIVALENT = ROOT / "tests" / "equivalent_mutants.txt"
KILLED = {1, 3, 36, -24, 24, 152, 255, -11, -9}  # test failure, internal error, timeout, crash
SURVIVED = {0, 5, 33}  # tests passed; no test reached it


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
    for meta in sorted((ROOT / "mutants" / "segcore").glob("*.py.meta")):
        data = json.loads(meta.read_text())
        out[meta.name.removesuffix(".meta")] = data.get("exit_code_by_key", {})
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
        print(f"| segcore/{module} | {total} | {c['killed']} | {c['survived']} | "
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
    args = parser.parse_args()
    if not args.report:
        mutmut = Path(sys.executable).with_name("mutmut")
        subprocess.run([str(mutmut), "run", "--max-children", "2"], cwd=ROOT, check=False)
    return report()


if __name__ == "__main__":
    sys.exit(main())
