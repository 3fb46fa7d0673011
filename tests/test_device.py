"""The CPUs a process may use: affinity, cgroup quotas (v1 and v2, nested) and SLURM's share."""

from __future__ import annotations

import os

import pytest

from segcore.device import usable_cpus


def cgroup(tmp_path, lines: list[str], files: dict[str, str]):
    """A fake /proc/self/cgroup and /sys/fs/cgroup tree; returns (root, proc)."""
    proc, root = tmp_path / "proc", tmp_path / "cg"
    proc.mkdir(parents=True)
    (proc / "cgroup").write_text("\n".join(lines) + "\n")
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    return root, proc


@pytest.fixture
def four_cpus(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)


def test_the_tightest_of_affinity_cgroup_quota_and_slurm(tmp_path, four_cpus, monkeypatch):
    none = cgroup(tmp_path / "a", ["0::/"], {"cpu.max": "max 100000\n"})
    assert usable_cpus(*none) == 4  # the affinity mask, no quota
    v2 = cgroup(tmp_path / "b", ["0::/job/step"],
                {"cpu.max": "max 100000\n", "job/cpu.max": "250000 100000\n",
                 "job/step/cpu.max": "max 100000\n"})  # fmt: skip
    assert usable_cpus(*v2) == 3  # 2.5 CPUs of quota on a parent: 3 threads
    v1 = cgroup(tmp_path / "c", ["4:memory:/x", "2:cpu,cpuacct:/slurm/job1"],
                {"cpu/slurm/job1/cpu.cfs_quota_us": "200000\n",
                 "cpu/slurm/job1/cpu.cfs_period_us": "100000\n",
                 "cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"})  # fmt: skip
    assert usable_cpus(*v1) == 2
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert usable_cpus(*v1) == 1  # the array task's own share
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    assert usable_cpus(tmp_path / "nowhere", tmp_path / "nowhere") == 4  # no cgroup files


def test_a_cpu_quota_of_a_fraction_still_gives_one_thread(tmp_path, four_cpus):
    assert usable_cpus(*cgroup(tmp_path, ["0::/"], {"cpu.max": "50000 100000\n"})) == 1
