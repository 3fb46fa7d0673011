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

# real processes: `pytest -m "not slow"` skips them; one xdist worker runs the module, so
# its session fixture (a search or a trained model) is made once
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("report")]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="session")  # once per xdist worker, whatever the test order
def study_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    cli(tmp, "data", "--out", "d", "--n", 6, "--height", 48, "--width", 32)
    (tmp / "space.yaml").write_text(tiny_space(3, 2, 6))
    # not --quiet, and to a pipe: what a log file gets
    out = cli(tmp, "search", "--space", "space.yaml", "--study", "r", "--data", "d")
    (tmp / "search.out").write_text(out.stdout)
    (tmp / "search.err").write_text(out.stderr)
    return tmp


def test_a_search_logged_to_a_file_has_no_carriage_returns(study_dir):
    out, err = (study_dir / "search.out").read_text(), (study_dir / "search.err").read_text()
    assert "\r" not in out + err and "score: 1/1 images (100%)" in err and "report: " in err
    assert out.rstrip().splitlines()[-1].startswith("best model: reports/r/best.pt: test mIoU")


def test_report_files_pictures_and_links(study_dir):
    out = study_dir / "reports" / "r"
    for name in ("history.png", "intermediate.png", "parallel.png", "slice.png", "index.html",
                 "table.json", "best.json", "scores.json", "curves.png", "tradeoff.png",
                 "best.pt"):  # fmt: skip
        assert (out / name).is_file(), name
    pngs = list(out.rglob("*.png"))
    assert "Optimism gap (validation minus test)" in (out / "index.html").read_text()
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
    assert {"trial", "state", "epochs_run", "params", "costs"} <= set(rows[0])
    assert set(rows[0]["costs"]) == {"params", "gflop_per_patch", "infer_ms", "seconds_per_epoch"}


def test_every_trial_records_its_costs_and_curves_where_the_dashboard_shows_them(study_dir):
    dash = Dashboard(study_dir, "r")
    try:
        study_id = dash.get("/api/studies")["study_summaries"][0]["study_id"]
        trials = dash.get(f"/api/studies/{study_id}?after=0")["trials"]
    finally:
        dash.stop()
    trained = [t for t in trials if t["state"] in ("Complete", "Pruned")]
    assert len(trained) == 6
    for t in trained:
        attrs = {a["key"]: a["value"] for a in t["user_attrs"]}
        for key in ("params", "gflop_per_patch", "infer_ms", "seconds_per_epoch", "history"):
            assert key in attrs, (t["number"], sorted(attrs))
        csv = [a for a in t["artifacts"] if a["filename"] == "curves.csv"]
        assert len(csv) == 1 and csv[0]["mimetype"] == "text/csv"


def test_report_without_finished_trials_is_a_clear_error(study_dir):
    from segsearch.space import load_space
    from segsearch.study import create_study

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
            # the winner's note: its validation full-image mIoU and per-class table
            miou = best["validation"]["full_image_miou"]
            page.get_by_text(f"Validation full-image mIoU {miou:.4f}").first.wait_for(
                timeout=30_000
            )
            assert page.locator("th", has_text="ellipse").count() >= 1
            assert page.get_by_text("the winner, exported").count() >= 1
            # the study's note names the exported trial and its test mIoU
            page.goto(f"{dash.url}/dashboard/studies/{study_id}/note")
            page.get_by_text(f"the winner is trial {best['trial']}").first.wait_for(timeout=30_000)
            assert page.get_by_text(f"test mIoU {best['test']['miou']:.4f}").count() >= 1
            browser.close()
    finally:
        code, err = dash.stop()
    assert code == 0 and "dashboard stopped" in err


def test_a_search_under_an_inference_time_limit_hands_over_a_model_that_meets_it(tmp_path):
    """max_infer_ms between a narrow and a wide U-Net (measured here first): the wide ones are
    pruned untrained and say why, the winner meets the limit, the report draws the front."""
    import torch

    from segcore.config import TrialConfig
    from segcore.costs import measure
    from segcore.data import ZSCORE, load_folder

    cli(tmp_path, "data", "--out", "d", "--n", 6, "--height", 64, "--width", 64)
    image = load_folder(tmp_path / "d").normalized(ZSCORE).images[0]
    cfg = {"depth": 2, "patch_size": 32, "tta": True}
    ms = [measure(TrialConfig(**cfg, base_width=w, max_width=128), 1, 3, image,
                  torch.device("cpu"))["infer_ms"] for w in (2, 128)]  # fmt: skip
    limit = (ms[0] * ms[1]) ** 0.5
    assert ms[1] > 4 * ms[0], ms  # far enough apart for a noisy machine
    (tmp_path / "space.yaml").write_text(f"""
search:
  base_width: {{type: categorical, choices: [2, 128]}}
  lr: {{type: float, low: 0.01, high: 0.1, log: true}}
fixed: {{depth: 2, patch_size: 32, max_width: 128, epochs: 2, steps_per_epoch: 2, batch_size: 2,
        tta: true, val_patches_per_image: 2}}
constraints: {{max_infer_ms: {limit:.3f}}}
study: {{n_trials: 4, sampler: {{name: random}}, pruner: {{name: none}}, top_k: 2,
        warm_start: true}}
""")  # warm start: base_width 16 is not offered, so its first choice, 2: one feasible trial
    # one worker with a fixed seed draws the same trials every run: with seed 0 among them wide
    cli(tmp_path, "search", "--space", "space.yaml", "--study", "c", "--data", "d", "--quiet",
        "--no-final", "--workers", 1, "--seed", 0)  # fmt: skip
    trials = trials_via_optuna_cli(tmp_path, "c")
    best = json.loads((tmp_path / "reports" / "c" / "best.json").read_text())
    assert best["config"]["base_width"] == 2
    assert trials[best["trial"]]["user_attrs"]["infer_ms"] <= limit
    wide = [t for t in trials if t["params"]["base_width"] == 128]
    assert wide, trials  # the case this test is about
    for t in wide:  # every one over the limit: pruned untrained, saying why
        assert t["state"] == "PRUNED" and "epochs_run" not in t["user_attrs"], t
        assert "above max_infer_ms" in t["user_attrs"]["pruned_reason"], t
    pixels = np.asarray(Image.open(tmp_path / "reports" / "c" / "tradeoff.png").convert("RGB"))
    green = (pixels[..., 1] > 100) & (pixels[..., 0] < 80) & (pixels[..., 2] < 80)
    assert green.sum() > 60  # the front is drawn (rings: one feasible trial gives 85 pixels)
