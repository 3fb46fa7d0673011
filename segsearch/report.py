"""The study report: optuna's plots as PNG, the top-trials table, prediction panels, index.html."""

from __future__ import annotations

import html
import json
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

from segcore.errors import UserError
from segcore.files import atomic_write, write_text
from segcore.pictures import curves_plot, tradeoff_plot
from segcore.progress import progress as progress_of

PLOTS = [
    ("history.png", "Optimization history", "plot_optimization_history"),
    (
        "intermediate.png",
        "Validation patch mIoU per epoch (the pruning view)",
        "plot_intermediate_values",
    ),
    ("importances.png", "Parameter importances", "plot_param_importances"),
    ("parallel.png", "Parallel coordinates", "plot_parallel_coordinate"),
    ("slice.png", "Slice plots", "plot_slice"),
]


def _save_plot(study: optuna.Study, function: str, path: Path) -> str | None:
    """Draw one of optuna's matplotlib plots to PNG; returns why not, when it cannot be drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental plots; categorical axes; tight_layout
        try:
            axes = getattr(vis, function)(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as e:
            plt.close("all")
            return str(e).splitlines()[0] if str(e) else type(e).__name__
        first = axes.flat[0] if hasattr(axes, "flat") else axes
        fig = first.figure
        fig.set_size_inches(max(fig.get_figwidth(), 8), max(fig.get_figheight(), 4.5))
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close("all")
    return None


COSTS = ("params", "gflop_per_patch", "infer_ms", "seconds_per_epoch")  # trial user attrs


def top_table(study: optuna.Study, scores: dict, limit: int = 10) -> list[dict]:
    """Rows of the best finished trials by patch mIoU: hyperparameters, validation scores,
    epochs run, state, and what the model costs (parameters, FLOP, ms per image, s per epoch)."""
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    ranked = sorted(finished, key=lambda t: (-(t.value if t.value is not None else -1), t.number))
    return [
        {
            "trial": t.number,
            "state": t.state.name,
            "patch_miou": t.value,
            "full_image_miou": scores.get(str(t.number), {}).get("miou"),
            "epochs_run": len(t.intermediate_values),
            "params": t.params,
            "costs": {k: t.user_attrs.get(k) for k in COSTS},
        }
        for t in ranked[:limit]
    ]


def _study_plots(study: optuna.Study, space, out: Path) -> list[tuple[str, str, str | None]]:
    """Our own plots: every trial's curves, and validation mIoU against inference time."""
    trials = study.get_trials(deepcopy=False)
    measured = [
        {"number": t.number, "state": t.state.name, "value": t.value,
         "infer_ms": t.user_attrs["infer_ms"], "feasible": "pruned_reason" not in t.user_attrs}
        for t in trials
        if t.state.is_finished() and "infer_ms" in t.user_attrs
    ]  # fmt: skip
    curves = [{"number": t.number, "state": t.state.name, "history": t.user_attrs["history"]}
              for t in trials if t.user_attrs.get("history")]  # fmt: skip
    winner = (study.user_attrs.get("final") or {}).get("trial")
    scores = study.user_attrs.get("full_image_scores") or {}
    if winner is None and scores:
        from segsearch.promote import ranked

        winner = int(ranked(scores)[0])
    plots = []
    for file, title, items, draw in (
        ("curves.png", "Training curves of every trial", curves,
         lambda: curves_plot(out / "curves.png", curves)),
        ("tradeoff.png", "Accuracy against inference time (feasible front, limit, winner)",
         measured, lambda: tradeoff_plot(out / "tradeoff.png", measured,
                                         space.constraints.get("max_infer_ms"), winner)),
    ):  # fmt: skip
        if items:
            draw()
        plots.append((file, title, None if items else "no trial recorded it yet"))
    return plots


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def handed_over(study: optuna.Study) -> list[dict]:
    """The winner's validation figures (which chose it) beside the final model's test figures
    (which nothing chose from): rows of (what, images, mIoU, per-class IoU)."""
    from segsearch.final import winner
    from segsearch.promote import margin_text

    if not (study.user_attrs.get("promotion") or study.user_attrs.get("full_image_scores")):
        return []
    trial, best, noise = winner(study)
    budget = "final" if study.user_attrs.get("promotion") else "trial"
    rows = [
        {
            "what": f"winner: trial {trial.number}, validation full-image mIoU at the {budget} "
            f"budget (chose it)",
            "images": best["images"],
            "miou": best["miou"],
            "per_class": best["per_class"],
            "margin": margin_text(noise),
        }
    ]
    final = study.user_attrs.get("final") or {}
    if final.get("trial") == trial.number:
        test = final["test"]
        members = final.get("ensemble")
        what = f"ensemble of trials {', '.join(map(str, members))}" if members else "final model"
        rows.append({"what": f"{what} best.pt (trained on {final['train_on']}), test mIoU",
                     "images": test["images"], "miou": test["miou"],
                     "per_class": test["per_class"]})  # fmt: skip
        if final.get("test_single"):
            single = final["test_single"]
            rows.append({"what": f"trial {trial.number}'s model alone, test mIoU",
                         "images": single["images"], "miou": single["miou"],
                         "per_class": single["per_class"]})  # fmt: skip
    return rows


def _handed_over_html(rows: list[dict]) -> str:
    if not rows:
        return "<p>no rescored trial yet</p>"
    classes = list(rows[0]["per_class"])
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ["", "images", "mIoU", *classes])
    body = "".join(
        "<tr>" + f"<td style='text-align:left'>{html.escape(r['what'])}</td>"
        + "".join(f"<td>{_fmt(v)}</td>" for v in
                  [r["images"], r["miou"], *(r["per_class"].get(c) for c in classes)]) + "</tr>"
        for r in rows
    )  # fmt: skip
    gap = ""
    if len(rows) == 2:
        gap = (f"<p>Optimism gap (validation minus test): {rows[0]['miou'] - rows[1]['miou']:+.4f}"
               f". Validation images chose the winner; only the test figure is an honest "
               f"estimate.</p>")  # fmt: skip
    else:
        gap = "<p>No final fit yet (<code>final --study NAME</code>): no test figure.</p>"
    margin = f"<p>{html.escape(rows[0]['margin'])}</p>" if rows[0].get("margin") else ""
    return f"<table><tr>{head}</tr>{body}</table>{margin}{gap}"


def _index_html(name: str, plots: list[tuple[str, str, str | None]], rows: list[dict],
                panels: list[str], final: list[dict]) -> str:  # fmt: skip
    params = sorted({p for r in rows for p in r["params"]})
    head = "".join(f"<th>{html.escape(h)}</th>" for h in
                   ["trial", "state", "validation patch mIoU", "validation full-image mIoU",
                    "epochs", *params, "parameters", "GFLOP per patch", "ms per image",
                    "s per epoch"])  # fmt: skip
    body = "".join(
        "<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in
                         [r["trial"], r["state"], r["patch_miou"], r["full_image_miou"],
                          r["epochs_run"], *(r["params"].get(p) for p in params),
                          *(r["costs"][c] for c in COSTS)]) + "</tr>"
        for r in rows
    )  # fmt: skip
    figures = "".join(
        f'<figure><figcaption>{html.escape(title)}</figcaption><img src="{file}" alt="{title}">'
        f"</figure>"
        if why is None
        else f"<p>{html.escape(title)}: not drawn ({html.escape(why)})</p>"
        for file, title, why in plots
    )
    pictures = "".join(
        f'<figure><img src="{html.escape(p)}" alt="{html.escape(p)}"></figure>' for p in panels
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>train_optuna report: {html.escape(name)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}img{{max-width:100%}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
figure{{margin:1em 0}}figcaption{{font-weight:bold}}</style></head><body>
<h1>Study {html.escape(name)}</h1>
<h2>The model handed over</h2>{_handed_over_html(final)}
<h2>Top trials</h2><table><tr>{head}</tr>{body}</table>
<h2>Plots</h2>{figures}
<h2>Predictions of the rescored trials</h2>{pictures or "<p>no rescored trial yet</p>"}
</body></html>
"""


def write_report(study: optuna.Study, space, out: Path, progress: bool = True) -> Path:
    """Write plots, table.json, and index.html under `out`; panels are already in out/panels."""
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    if not finished:
        raise UserError(f"--study {study.study_name!r}: no finished trial yet; nothing to report")
    out.mkdir(parents=True, exist_ok=True)
    plots = []
    for file, title, function in progress_of(PLOTS, len(PLOTS), "report", "plots", progress):
        plots.append((file, title, _save_plot(study, function, out / file)))
    plots += _study_plots(study, space, out)
    scores = study.user_attrs.get("full_image_scores", {})
    rows = top_table(study, scores)
    write_text(out / "table.json", json.dumps(rows, indent=2) + "\n")
    panels = sorted(p.relative_to(out).as_posix() for p in (out / "panels").glob("*.png"))
    final = handed_over(study)
    write_text(out / "index.html", _index_html(study.study_name, plots, rows, panels, final))
    return out / "index.html"
