"""Reports and the dashboard on a tiny finished study: files, a real browser, concurrent readers."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import Dashboard, cli, tiny_space, trials_via_optuna_cli
from PIL import Image

pytestmark = pytest.mark.slow  # real processes: `pytest -m "not slow"` skips them

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="session")  # once per xdist worker, whatever the test order
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
            # every trial: 6 counted, plus any labelled over-budget FAIL from the workers' race
            trials = trials_via_optuna_cli(study_dir, "r")
            assert numbers == {t["number"] for t in trials} >= set(range(6)), numbers
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
