"""Reports and the dashboard on a tiny finished study: files, a real browser, concurrent readers."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, cli, env, states, tiny_space, trials_via_optuna_cli
from PIL import Image

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    cli(tmp, "data", "--out", "d", "--n", 6, "--height", 48, "--width", 32)
    (tmp / "space.yaml").write_text(tiny_space(3, 2, 6))
    cli(tmp, "search", "--space", "space.yaml", "--study", "r", "--data", "d", "--quiet")
    return tmp


def test_report_files_pictures_and_links(study_dir):
    out = study_dir / "reports" / "r"
    for name in ("history.png", "intermediate.png", "parallel.png", "slice.png", "index.html",
                 "table.json", "best.json", "scores.json"):  # fmt: skip
        assert (out / name).is_file(), name
    pngs = list(out.rglob("*.png"))
    panels = list((out / "panels").glob("*.png"))
    assert len(panels) == 2  # top 2 trials x 1 validation image (1 of the 6 is held out)
    for png in pngs:
        pixels = np.asarray(Image.open(png).convert("L"), dtype=np.float32)
        assert pixels.std() > 5, f"{png} looks blank"
    page = (out / "index.html").read_text()
    links = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert len(links) >= len(pngs) - 1  # importances may be skipped with a reason
    for link in links:
        assert (out / link).is_file(), link
    rows = json.loads((out / "table.json").read_text())
    assert rows[0]["patch_miou"] >= rows[-1]["patch_miou"]
    assert any(r["full_image_miou"] is not None for r in rows)
    assert {"trial", "state", "epochs_run", "params"} <= set(rows[0])


def test_report_without_finished_trials_is_a_clear_error(study_dir):
    from segcore.space import load_space
    from segcore.study import create_study

    url = f"sqlite:///{study_dir}/storage/fresh.db"  # created, but no worker has run yet
    create_study("fresh", url, load_space(study_dir / "space.yaml"), None, None)
    proc = cli(study_dir, "report", "--study", "fresh", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --study 'fresh': no finished trial yet; nothing to report"
    ]
    assert not (study_dir / "reports" / "fresh").exists()


class Dashboard:
    def __init__(self, cwd, study):
        self.port = free_port()
        # a file, not a pipe: the access log of hundreds of requests would fill a pipe and block
        self.log = cwd / f"dashboard-{self.port}.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "train_optuna.py"), "dashboard", "--study", study,
                 "--port", str(self.port)], cwd=cwd, env=env(), stdout=log, stderr=log,
            )  # fmt: skip
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.url + "/api/studies", timeout=2).read()
                return
            except OSError:
                assert self.proc.poll() is None, self.log.read_text()
                time.sleep(0.3)
        raise AssertionError("dashboard did not start")

    def get(self, path):
        return json.loads(urllib.request.urlopen(self.url + path, timeout=30).read())

    def stop(self):
        self.proc.send_signal(2)
        self.proc.wait(timeout=30)
        return self.proc.returncode, self.log.read_text()


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium not installed")
def test_dashboard_in_a_real_browser(study_dir):
    from playwright.sync_api import sync_playwright

    best = json.loads((study_dir / "reports" / "r" / "best.json").read_text())
    dash = Dashboard(study_dir, "r")
    try:
        study_id = dash.get("/api/studies")["study_summaries"][0]["study_id"]
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM,
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                      "--disable-component-update", "--disable-sync", "--no-first-run"],
            )  # fmt: skip
            page = browser.new_page()
            page.goto(f"{dash.url}/dashboard/studies/{study_id}/trials")
            items = page.get_by_text(re.compile(r"^Trial \d+"))
            items.first.wait_for(timeout=30_000)
            numbers = {int(t.split()[1]) for t in items.all_inner_texts()}
            assert numbers == set(range(6)), numbers
            page.goto(f"{dash.url}/dashboard/studies/{study_id}/trials?numbers={best['trial']}")
            page.get_by_text(re.compile(r"^prediction-.*\.png$")).first.wait_for(timeout=30_000)
            img = page.locator("img[src*='/artifacts/']").first
            page.wait_for_function("img => img.complete && img.naturalWidth > 0",
                                   arg=img.element_handle(), timeout=30_000)  # fmt: skip
            assert img.evaluate("img => img.naturalWidth") > 100  # the panel, not an icon
            browser.close()
    finally:
        code, err = dash.stop()
    assert code == 0 and "dashboard stopped" in err


def test_dashboard_reading_while_workers_write(study_dir):
    (study_dir / "busy.yaml").write_text(tiny_space(6, 10, 6))
    search = subprocess.Popen(
        [sys.executable, str(ROOT / "train_optuna.py"), "search", "--space", "busy.yaml",
         "--study", "b", "--data", "d", "--workers", "2", "--quiet"],
        cwd=study_dir, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    while not (study_dir / "storage" / "b.db").exists() and search.poll() is None:
        time.sleep(0.2)
    time.sleep(3)
    dash = Dashboard(study_dir, "b")
    reads = 0
    try:
        ids = [s["study_id"] for s in dash.get("/api/studies")["study_summaries"]
               if s["study_name"] == "b"]  # fmt: skip
        while search.poll() is None:
            dash.get(f"/api/studies/{ids[0]}?after=0")
            reads += 1
    finally:
        dash.stop()
    _, err = search.communicate(timeout=120)
    assert search.returncode == 0, err[-2000:]
    assert reads > 5
    trials = trials_via_optuna_cli(study_dir, "b")
    counts = states(trials)
    failed = [t["user_attrs"].get("fail_reason", "") for t in trials if t["state"] == "FAIL"]
    # the only failure allowed is two workers racing for the last slot, never a storage error
    assert all(r.startswith("over budget") for r in failed), failed
    assert "RUNNING" not in counts
    assert counts.get("COMPLETE", 0) + counts.get("PRUNED", 0) == 6
