"""The README's two pictures of a finished study: its report, and the winner's trial page in
optuna-dashboard (its note, costs and curves), taken with the headless chromium the tests use.

    python docs/screenshots.py --study NAME     # run where the study's storage/ and reports/ are
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ENTRY = DOCS.parent / "train_optuna.py"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", required=True)
    parser.add_argument("--port", type=int, default=8093)
    parser.add_argument("--out", default=str(DOCS))
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    out = Path(args.out)
    report = Path("reports") / args.study / "index.html"
    best = json.loads((Path("reports") / args.study / "best.json").read_text())
    dash = subprocess.Popen([sys.executable, str(ENTRY), "dashboard", "--study", args.study,
                             "--port", str(args.port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{args.port}"
    try:
        for _ in range(120):
            try:
                studies = json.loads(urllib.request.urlopen(url + "/api/studies").read())
                break
            except OSError:
                time.sleep(0.5)
        study_id = next(s["study_id"] for s in studies["study_summaries"]
                        if s["study_name"] == args.study)  # fmt: skip
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(report.resolve().as_uri())
            page.wait_for_load_state("load")
            page.screenshot(path=str(out / "report.png"))
            page.goto(f"{url}/dashboard/studies/{study_id}/trials?numbers={best['trial']}")
            page.get_by_text("the winner, exported").first.wait_for(timeout=60_000)
            page.wait_for_timeout(1500)  # the pictures and the CSV table load after the note
            page.screenshot(path=str(out / "dashboard-winner.png"))
            browser.close()
    finally:
        dash.terminate()
        dash.wait(timeout=30)
    print(f"wrote {out / 'report.png'} and {out / 'dashboard-winner.png'}")


if __name__ == "__main__":
    main()
