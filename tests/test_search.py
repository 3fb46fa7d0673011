"""The search service end to end: real worker processes on a real SQLite file (and on PostgreSQL),
checked with the independent `optuna` command line. Faults are in tests/test_faults.py."""

from __future__ import annotations

import json
import shutil

import optuna
import pytest
import torch
from helpers import Dashboard, cli, states, tiny_space, trials_via_optuna_cli

from segsearch.artifacts import listed

# real processes: `pytest -m "not slow"` skips them; one xdist worker runs the module, so
# its session fixture (a search or a trained model) is made once
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("search")]


@pytest.fixture(scope="session")  # once per xdist worker, whatever the test order
def workdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("search")
    cli(tmp, "data", "--out", "d", "--n", 6, "--height", 48, "--width", 32)
    (tmp / "space.yaml").write_text(tiny_space(4, 2))
    return tmp


@pytest.fixture(scope="session")  # once per xdist worker, whatever the test order
def searched(workdir):
    out = cli(workdir, "search", "--space", "space.yaml", "--study", "s", "--data", "d",
              "--workers", 2, "--quiet")  # fmt: skip
    assert "best model: reports/s/best.pt: test mIoU" in out.stdout.splitlines()[-1]
    return workdir


def test_budget_met_exactly_with_pruning_and_nothing_running(searched):
    trials = trials_via_optuna_cli(searched, "s")
    counts = states(trials)
    assert counts.get("COMPLETE", 0) + counts.get("PRUNED", 0) == 8, counts
    assert counts.get("PRUNED", 0) >= 1 and counts.get("RUNNING", 0) == 0
    pids = {t["user_attrs"]["pid"] for t in trials if "pid" in t["user_attrs"]}
    assert len(pids) == 2  # two worker processes shared the study
    assert "FAIL" not in counts, counts  # the slot lock: no worker starts a trial too many
    for t in trials:  # the full config of every trial is in its user attributes
        assert t["user_attrs"]["config"]["patch_size"] == t["params"]["patch_size"]
    assert (searched / "storage" / "s" / "worker-0.log").stat().st_size > 0


def test_checkpoints_only_for_top_k(searched):
    check_checkpoints(searched, "s", f"sqlite:///{searched}/storage/s.db")


def check_checkpoints(searched, name, url):
    trials = trials_via_optuna_cli(searched, name, url)
    done = sorted((t for t in trials if t["state"] == "COMPLETE"), key=lambda t: -t["value"])
    top = {t["number"] for t in done[:2]}
    study = optuna.load_study(study_name=name, storage=url)
    number_of = {t._trial_id: t.number for t in study.trials}
    live = {meta["artifact_id"]: number_of[trial_id] for trial_id, _, meta in listed(study)
            if meta["filename"] == "checkpoint.pt"}  # fmt: skip
    files = {f.name for f in (searched / "storage" / name / "artifacts").iterdir()}
    others = {m["artifact_id"] for _, _, m in listed(study) if m["filename"] != "checkpoint.pt"}
    curves = {m.artifact_id for t in study.trials  # every trial's curves.csv, never removed
              for m in optuna.artifacts.get_all_artifact_meta(t, storage=study._storage)}  # fmt: skip
    assert files - others - curves == set(live) and set(live.values()) == top, (live, top)
    assert not [m for _, _, m in listed(study) if m["filename"] == "resume.pt"]  # all dropped


def test_scores_best_json_and_best_pt(searched):
    scores = json.loads((searched / "reports" / "s" / "scores.json").read_text())
    assert len(scores) == 2
    best = json.loads((searched / "reports" / "s" / "best.json").read_text())
    assert str(best["trial"]) in scores
    assert best["validation"]["full_image_miou"] == max(s["miou"] for s in scores.values())
    assert set(best) >= {"config", "study", "trial", "data", "test_data", "split", "seed",
                         "threads", "precision", "validation", "test", "model", "params",
                         "versions"}  # fmt: skip
    assert best["data"] == str((searched / "d").resolve()) and best["threads"] == 1
    assert [len(best["split"][k]) for k in ("train", "validation", "test")] == [4, 1, 1]
    # best.pt is the final model: evaluate scores its test image to the figure in best.json
    out = cli(searched, "evaluate", "--model", best["model"], "--split", "test", "--json")
    assert json.loads(out.stdout)["miou"] == best["test"]["miou"]
    assert best["test"]["images"] == 1
    cli(searched, "predict", "--model", best["model"], "--images", "d", "--out", "pred",
        "--quiet")  # fmt: skip
    assert len(list((searched / "pred").glob("*_overlay.png"))) == 6


def test_train_with_best_json_reproduces_best_pt(searched, tmp_path):
    """No --data: the data folder, split and thread count come from best.json."""
    best = json.loads((searched / "reports" / "s" / "best.json").read_text())
    out = cli(searched, "train", "--config", "reports/s/best.json", "--out", tmp_path / "re.pt",
              "--quiet")  # fmt: skip
    assert f"using {best['data']} from reports/s/best.json" in out.stderr
    again = torch.load(tmp_path / "re.pt", weights_only=True)["extra"]
    assert abs(again["test"]["miou"] - best["test"]["miou"]) <= 0.002, (again["test"], best)
    assert again["split"] == best["split"]


def test_train_computes_in_the_precision_best_json_records(searched, tmp_path):
    """CPU results depend on the precision: a retraining follows the record, and says so when
    this machine would have chosen the other one."""
    best = json.loads((searched / "reports" / "s" / "best.json").read_text())
    other = {"bf16": "fp32", "fp32": "bf16"}[best["precision"]]
    (tmp_path / "other.json").write_text(json.dumps({**best, "precision": other}))
    out = cli(searched, "train", "--config", tmp_path / "other.json", "--out", tmp_path / "o.pt",
              "--epochs", 1, "--quiet")  # fmt: skip
    assert f"note: computing in {other}, as {tmp_path / 'other.json'} records, not " in out.stderr
    assert torch.load(tmp_path / "o.pt", weights_only=True)["extra"]["precision"] == other


def test_resume_tops_up_to_the_budget(searched, tmp_path):
    copy = tmp_path / "copy"  # a copy: the session's study stays as the other tests read it
    shutil.copytree(searched, copy)
    before = trials_via_optuna_cli(copy, "s")
    first = {t["user_attrs"]["sampler_seed"] for t in before}
    cli(copy, "search", "--space", "space.yaml", "--study", "s", "--data", searched / "d",
        "--workers", 2, "--n-trials", 10, "--quiet", "--no-rescore")  # fmt: skip
    trials = trials_via_optuna_cli(copy, "s")
    counts = states(trials)
    assert counts.get("COMPLETE", 0) + counts.get("PRUNED", 0) == 10, counts
    resumed = {t["user_attrs"]["sampler_seed"] for t in trials if t["number"] >= len(before)}
    assert resumed and not resumed & first, (first, resumed)  # fresh seeds on resume


def test_score_and_export_commands(searched, tmp_path):
    copy = tmp_path / "copy"  # rescoring rewrites scores.json: not the session's study
    shutil.copytree(searched, copy)
    out = cli(copy, "score", "--study", "s", "--top-k", 1)
    assert out.stdout.count("full-image mIoU") == 1
    cli(copy, "export", "--study", "s", "--out", "b2.json")
    assert json.loads((copy / "b2.json").read_text())["study"] == "s"


def test_every_command_on_postgres(workdir, postgres_url):
    """search, a worker joining from another shell, score, export, report and dashboard, all on
    one PostgreSQL database; the password never shows in output or logs."""
    password = postgres_url.split(":")[2].split("@")[0]
    pg = ["--storage", postgres_url]
    out = cli(workdir, "search", "--space", "space.yaml", "--study", "p", "--data", "d", *pg,
              "--workers", 2, "--quiet")  # fmt: skip
    assert "best model: reports/p/best.pt" in out.stdout and "***@" in out.stderr
    counts = states(trials_via_optuna_cli(workdir, "p", postgres_url))
    assert counts.get("COMPLETE", 0) + counts.get("PRUNED", 0) == 8 and "RUNNING" not in counts
    check_checkpoints(workdir, "p", postgres_url)
    optuna.load_study(study_name="p", storage=postgres_url).set_user_attr("n_trials", 9)
    joined = cli(workdir, "worker", "--study", "p", *pg)  # one more trial, then done
    counts = states(trials_via_optuna_cli(workdir, "p", postgres_url))
    assert counts.get("COMPLETE", 0) + counts.get("PRUNED", 0) == 9 and "RUNNING" not in counts
    score = cli(workdir, "score", "--study", "p", "--top-k", 1, *pg)
    assert score.stdout.count("full-image mIoU") == 1
    cli(workdir, "export", "--study", "p", "--out", "p.json", *pg)
    assert json.loads((workdir / "p.json").read_text())["study"] == "p"
    assert (workdir / "reports" / "p" / "index.html").is_file()  # search ends with report
    dash = Dashboard(workdir, "p", postgres_url)
    try:
        names = [s["study_name"] for s in dash.get("/api/studies")["study_summaries"]]
    finally:
        code, log = dash.stop()
    assert "p" in names and code == 0
    logs = [f.read_text() for f in (workdir / "storage" / "p").glob("worker-*.log")]
    for text in [out.stdout, out.stderr, joined.stderr, score.stderr, log, *logs]:
        assert password not in text


@pytest.mark.parametrize("ensemble", [1, 2])
def test_the_finalists_are_trained_at_the_final_budget_and_the_best_there_is_handed_over(
    workdir, ensemble
):
    """study.finalists: the two best rescored trials are trained again with the final config,
    in two processes at once, scored on whole validation images; the best of them is the
    winner, and with `final: train_on: train` its model is best.pt as it is (no refit); with
    `final: ensemble: 2` best.pt holds both finalists' models, their probabilities averaged."""
    name = f"promoted-{ensemble}"
    space = tiny_space(3, 2).replace("  top_k: 2\n", "  top_k: 2\n  finalists: 2\n")
    space += f"final: {{epochs: 4, train_on: train, ensemble: {ensemble}}}\n"
    (workdir / f"{name}.yaml").write_text(space)
    out = cli(workdir, "search", "--space", f"{name}.yaml", "--study", name, "--data", "d",
              "--workers", 2, "--quiet")  # fmt: skip
    reports = workdir / "reports" / name
    scores = json.loads((reports / "scores.json").read_text())
    promoted = json.loads((reports / "promotion.json").read_text())
    assert set(promoted) == set(scores) and len(promoted) == 2  # top_k 2, both finalists
    for number, s in promoted.items():
        assert s["interval"][0] <= s["miou"] <= s["interval"][1]
        assert f"finalist trial {number}: validation full-image mIoU {s['miou']:.4f}" in out.stdout
        assert (workdir / "storage" / name / f"promote-{number}.log").is_file()  # its own process
        finalist = torch.load(reports / "finalists" / f"trial-{number}.pt", weights_only=True)
        assert finalist["config"]["epochs"] == 4 and finalist["config"]["train_on"] == "train"
        assert (
            finalist["extra"]["validation"]["miou"] == s["miou"] and "test" not in finalist["extra"]
        )
    best = json.loads((reports / "best.json").read_text())
    number, top = max(promoted.items(), key=lambda kv: (kv[1]["miou"], -int(kv[0])))
    assert best["trial"] == int(number) and best["validation"]["budget"] == "final"
    assert best["validation"]["full_image_miou"] == top["miou"]
    noise = best["validation"]["noise"]
    other = next(n for n in promoted if n != number)
    assert noise["runner_up"]["trial"] == int(other)
    assert noise["runner_up"]["margin"] == pytest.approx(top["miou"] - promoted[other]["miou"])
    assert f"Margin {noise['runner_up']['margin']:+.4f} over the runner-up" in out.stdout
    # best.pt is the winning finalist's model, scored once on the test images
    handed = torch.load(workdir / best["model"], weights_only=True)
    finalist = torch.load(reports / "finalists" / f"trial-{number}.pt", weights_only=True)
    assert all(torch.equal(handed["state_dict"][k], v) for k, v in finalist["state_dict"].items())
    assert (
        handed["extra"]["kept_finalist"] and handed["extra"]["test"]["miou"] == best["test"]["miou"]
    )
    scored = cli(workdir, "evaluate", "--model", best["model"], "--split", "test", "--json")
    assert json.loads(scored.stdout)["miou"] == pytest.approx(best["test"]["miou"], abs=1e-6)
    if ensemble == 2:  # the runner-up's model is the second member; the winner alone is measured
        runner = torch.load(reports / "finalists" / f"trial-{other}.pt", weights_only=True)
        (member,) = handed["members"]
        assert all(torch.equal(member["state_dict"][k], v)
                   for k, v in runner["state_dict"].items())  # fmt: skip
        assert best["ensemble"] == [int(number), int(other)]
        alone = cli(workdir, "evaluate", "--model", f"reports/{name}/finalists/trial-{number}.pt",
                    "--split", "test", "--json")  # fmt: skip
        assert json.loads(alone.stdout)["miou"] == pytest.approx(best["test_single"]["miou"])
        assert "s model alone, test mIoU" in (reports / "index.html").read_text()
    else:
        assert "members" not in handed and best["ensemble"] is None
    # finishing again trains no finalist again: their model files are kept as they are
    stamps = {f: f.stat().st_mtime_ns for f in (reports / "finalists").glob("trial-*.pt")}
    again = cli(workdir, "finish", "--study", name, "--quiet")
    assert "promotion: training" not in again.stderr
    assert {f: f.stat().st_mtime_ns for f in stamps} == stamps
    assert json.loads((reports / "best.json").read_text())["trial"] == best["trial"]


def test_a_lead_over_the_warm_start_too_few_images_can_show_keeps_the_warm_start(workdir):
    """The data's 6 images leave fewer than 8 for validation: whatever a finalist's lead over the
    warm start (here one of lr 1e-4, which barely trains), the warm start is handed over, and
    the search says which trial led, by how much, and why it was not taken."""
    space = tiny_space(3, 2, trials=4).replace("  top_k: 2\n", "  top_k: 2\n  finalists: 2\n")
    space += "  warm_start: {patch_size: 16, depth: 1, lr: 1.0e-4, aug_strength: 0.0}\n"
    space += "final: {epochs: 3, train_on: train}\n"
    (workdir / "kept.yaml").write_text(space)
    out = cli(workdir, "search", "--space", "kept.yaml", "--study", "kept", "--data", "d",
              "--workers", 2, "--quiet")  # fmt: skip
    reports = workdir / "reports" / "kept"
    promoted = json.loads((reports / "promotion.json").read_text())
    best = json.loads((reports / "best.json").read_text())
    assert best["trial"] == 0 and best["validation"]["full_image_miou"] == promoted["0"]["miou"]
    leader = max(promoted, key=lambda n: (promoted[n]["miou"], -int(n)))
    if leader != "0":  # the usual case: a trained finalist led the untrained warm start
        kept = best["validation"]["noise"]["kept_warm_start"]
        margin = promoted[leader]["miou"] - promoted["0"]["miou"]
        assert kept["trial"] == int(leader) and kept["margin"] == pytest.approx(margin)
        assert (
            f"The warm start is handed over: trial {leader} led it by {margin:+.4f}" in out.stdout
        )
        assert "validation images, too few to show the noise" in out.stdout
        assert "(validation full-image mIoU" in out.stdout.splitlines()[-1]
        assert "the warm start, kept" in out.stdout.splitlines()[-1]


def test_budgets_in_seconds_become_the_steps_each_trial_and_best_pt_trained(workdir):
    """`seconds` in fixed and final: each trial records the steps its measured step time gave
    (and seconds 0), and best.json holds exactly the config best.pt trained, so that `train
    --config best.json` retrains it with the same steps instead of measuring again."""
    space = tiny_space(2, 1, trials=3).replace("fixed: {", "fixed: {seconds: 1.0, ")
    space += "final: {epochs: 2, seconds: 2.0}\n"
    (workdir / "timed.yaml").write_text(space)
    cli(workdir, "search", "--space", "timed.yaml", "--study", "timed", "--data", "d",
        "--workers", 1, "--quiet")  # fmt: skip
    study = optuna.load_study(study_name="timed", storage="sqlite:///" + str(
        workdir / "storage" / "timed.db"))  # fmt: skip
    for trial in study.get_trials(states=[optuna.trial.TrialState.COMPLETE]):
        cfg = trial.user_attrs["config"]
        assert cfg["seconds"] == 0 and trial.user_attrs["step_seconds"] > 0
        assert cfg["steps_per_epoch"] == max(1, round(1.0 / (2 * trial.user_attrs["step_seconds"])))
    best = json.loads((workdir / "reports" / "timed" / "best.json").read_text())
    model = torch.load(workdir / best["model"], weights_only=True)
    assert best["config"] == model["config"] and best["config"]["seconds"] == 0
    assert model["extra"]["seconds"] == 2.0 and model["extra"]["step_seconds"] > 0
