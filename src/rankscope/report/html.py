"""``rankscope report``: a self-contained ``report.html`` (figures embedded, no network) and ``summary.json``
for a study or a single run."""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from rankscope.report import study_figures as figs
from rankscope.report.data import StudyData, load
from rankscope.report.verdict import CLAIMS, MIN_SEEDS, per_run_table, verdict
from rankscope.vocab import PRODUCT, REFERENCE_VARIANT

CAPTIONS = {
    "heatmaps": "Per variant, layer × step (mean over seeds): outliers under the structure-matched product null, "
                "spikes (the sequential count; grey where the bulk is not noise-shaped, so there is no count), "
                "outliers under the naive MP fit, spike strength λ_max / bulk edge (log colour), stable and effective "
                "rank.",
    "head_maps": "Outliers per (layer, head) at an early, a middle and the final monitored step (product null).",
    "decoupled_blocks": "MLA-Decoupled: the content block and the rope block (whose key is shared by all heads).",
    "esd_steps": "Eigenvalue histogram of the spikiest layer-level form at three steps, with the fitted product "
                 "null's density and its bulk edge.",
    "spike_onset": "First monitored step at which each layer has an outlier: if spikes propagate, onset moves "
                   "with depth.",
    "rank_vs_outliers": "Effective rank (÷ rank) against outlier energy per (run, layer, step).",
    "loss": "Validation loss per variant, with the min–max band over seeds.",
    "sweep": "The comparison at each value of the sweep axis: the outlier fraction (outliers / rank) per variant.",
}

STATS_HTML = """<details><summary>What the statistics are</summary><ul>
<li>All from the layer-level query–key forms at the monitored steps after initialisation, per run, then the mean
and a bootstrap CI across seeds; "− {reference}" rows are paired by seed.</li>
<li><b>outliers</b> are eigenvalues above the edge of the null fitted to the whole spectrum ("not noise");
<b>spikes</b> are eigenvalues above the spectrum's own noise bulk, counted sequentially against deflated nulls and
reported only where the bulk left fits the null's shape. The statistics below read outliers.</li>
<li><b>cells_with_outliers</b>: share of (layer, step) cells with at least one eigenvalue above the bulk edge;
<b>head_cells_with_outliers</b>: the same per head.</li>
<li><b>outlier_fraction</b>: mean outliers / rank per cell; <b>outlier_energy</b>: mean share of Σλ in outliers.</li>
<li><b>first_spike</b>: first step with an outlier in any layer, as a fraction of training (1 = never);
<b>layers_spiked_by_mid</b>: share of layers with an outlier by mid-training; <b>persistence</b>: share of a
layer's cells from its first spike on that still have outliers.</li>
<li><b>spike_rank_corr</b>: Spearman correlation over (layer, step) of outlier energy with the relative drop of
effective rank since step 0 (both grow with training, so this is a co-occurrence, not a cause).</li>
<li><b>final_effective_rank</b>: mean over layers of effective rank / rank at the last step.</li>
<li>A claim is <i>reproduced</i> when every CI it rests on lies on the claimed side of 0, <i>not reproduced</i>
when one lies on the other side, and <i>inconclusive</i> otherwise or with fewer than 3 seeds.</li>
</ul></details>"""

_CHECK = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (im) {
    var r = im.getBoundingClientRect();
    return im.complete && im.naturalWidth > 0 && r.width > 0 && r.height > 0 &&
           getComputedStyle(im).visibility !== 'hidden';
  });
  document.body.setAttribute('data-figures', ok.length + '/' + imgs.length);
});
</script>"""

_STYLE = """<style>
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
.reproduced { background: #d7f5d7; } .not { background: #f8d6d6; } .inconclusive { background: #f5f0d0; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; } code, pre { background: #f6f6f6; padding: 0.1em 0.3em; }
pre { padding: 0.8em; overflow-x: auto; font-size: 0.8em; }
</style>"""


def _fmt(ci) -> str:
    mean, lo, hi = ci
    if not math.isfinite(mean):
        return "–"
    return f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.stem)}">'


def _json_safe(obj):
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return None if not math.isfinite(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _runs_table(data: StudyData) -> str:
    runs = data.runs.copy()
    final = data.train.dropna(subset=["val_loss"]).sort_values("step").groupby(["sweep", "name"]).tail(1) \
        if not data.train.empty and "val_loss" in data.train else pd.DataFrame(columns=["sweep", "name", "val_loss"])
    runs = runs.merge(final[["sweep", "name", "val_loss"]], on=["sweep", "name"], how="left")
    def first(values: pd.Series) -> str:  # the same for every seed of a variant; absent for a lone run
        values = values.dropna()
        return f"{int(values.iloc[0]):,}" if len(values) else "–"

    rows = [f"<tr><td class=l>{html.escape(sweep)}</td><td class=l>{html.escape(variant)}</td><td>{len(g)}</td>"
            f"<td>{first(g['params'])}</td><td>{first(g['kv_cache_floats_per_token'])}</td>"
            f"<td>{g['val_loss'].mean():.3f} ± {g['val_loss'].std(ddof=0):.3f}</td></tr>"
            for (sweep, variant), g in runs.groupby(["sweep", "variant"], sort=False)]
    return ("<table><tr><th class=l>sweep</th><th class=l>variant</th><th>seeds</th><th>parameters</th>"
            "<th>KV-cache floats / token</th><th>final validation loss</th></tr>" + "".join(rows) + "</table>")


def _unfinished(data: StudyData) -> str:
    missing = len(data.meta["runs"]) - len(data.runs)
    if missing <= 0:
        return ""
    return (f"<p><b>{missing} of {len(data.meta['runs'])} runs are not finished</b> and are left out of every "
            "figure and statistic below; re-run the study command to finish them.</p>")


def _verdict_html(summary: dict) -> str:
    parts = []
    for point in summary["points"]:
        null = "product null" if point["null"] == PRODUCT else "naive MP null"
        parts.append(f"<h3>{html.escape(point['sweep'])} — {null}</h3><table><tr><th class=l>claim</th>"
                     "<th class=l>verdict</th><th class=l>evidence</th></tr>")
        for key, claim in point["claims"].items():
            v = claim["verdict"]
            cls = "reproduced" if v == "reproduced" else "not" if v.startswith("not") else "inconclusive"
            evidence = "<br>".join(f"{html.escape(k)}: {html.escape(r)}" for k, r in claim["evidence"].items())
            parts.append(f"<tr><td class=l>({key}) {html.escape(CLAIMS[key])}</td><td class='l {cls}'>{v}</td>"
                         f"<td class=l>{evidence}</td></tr>")
        parts.append("</table>")
        stats = list(next(iter(point["variants"].values())).keys())
        stats = [s for s in stats if s != "seeds"]
        parts.append("<table><tr><th class=l>variant</th>" + "".join(f"<th>{s}</th>" for s in stats) + "</tr>")
        for variant, values in point["variants"].items():
            parts.append(f"<tr><td class=l>{html.escape(variant)}</td>"
                         + "".join(f"<td>{_fmt(values[s])}</td>" for s in stats) + "</tr>")
        for variant, values in point["vs_reference"].items():
            parts.append(f"<tr><td class=l>{html.escape(variant)} − {html.escape(REFERENCE_VARIANT)}</td>"
                         + "".join(f"<td>{_fmt(values[s])}</td>" for s in stats) + "</tr>")
        parts.append("</table>")
    return "\n".join(parts)


def write_report(root: str | Path) -> Path:
    """Figures, ``summary.json`` and ``report.html`` in ``root`` (a study or a run directory)."""
    data = load(root)
    root = Path(root)
    out = root / "figures"
    per_run = per_run_table(data.attention, data.runs)
    summary = verdict(per_run)
    summary["per_run"] = per_run.to_dict("records")
    summary["command"] = data.meta.get("command")
    (root / "summary.json").write_text(json.dumps(_json_safe(summary), indent=1) + "\n")
    sections = []
    for sweep in sorted(data.runs["sweep"].unique()):
        target = out / sweep.replace("/", "_")
        paths = [figs.loss_curves(data, sweep, target), figs.heatmaps(data, sweep, target),
                 figs.head_maps(data, sweep, target), figs.decoupled_blocks(data, sweep, target),
                 figs.esd_steps(data, sweep, target), figs.spike_onset(data, sweep, target),
                 figs.rank_vs_outliers(data, sweep, target)]
        body = "".join(f"<figure>{_img(p)}<figcaption>{html.escape(CAPTIONS[p.stem])}</figcaption></figure>"
                       for p in paths if p is not None)
        sections.append(f"<h2>Figures — {html.escape(sweep)}</h2>{body}")
    sweep_fig = figs.sweep_summary(per_run, out)
    if sweep_fig is not None:
        sections.insert(0, f"<h2>Sweep</h2><figure>{_img(sweep_fig)}<figcaption>{CAPTIONS['sweep']}</figcaption>"
                           "</figure>")
    command = data.meta.get("command") or f"rankscope report {root}"
    configs = {r["name"] + ("" if r["sweep"] == "base" else f" ({r['sweep']})"): r["config"]
               for r in data.meta["runs"]}
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>rankscope report: {html.escape(root.name)}</title>
{_STYLE}</head><body>
<h1>Rank collapse in attention: {html.escape(root.name)}</h1>
<p>Reproduces the comparison of Jha &amp; Reagen, <i>A Random Matrix Theory Perspective on the Learning Dynamics
of Multi-head Latent Attention</i> (arXiv 2507.09394). Every statistic is given under the structure-matched
product null (the correct null for a product of matrices) and under the naive Marchenko–Pastur fit. Verdicts need
at least {MIN_SEEDS} seeds; CIs are 95 % percentile bootstraps across seeds (differences paired by seed).</p>
<p>Reproduce with: <code>{html.escape(command)}</code></p>
<h2>Runs</h2>{_runs_table(data)}{_unfinished(data)}
<h2>Verdict</h2>{STATS_HTML.format(reference=html.escape(REFERENCE_VARIANT))}{_verdict_html(summary)}
{''.join(sections)}
<h2>Configurations</h2><details><summary>resolved config of every run</summary>
<pre>{html.escape(json.dumps(configs, indent=1))}</pre></details>
{_CHECK}
</body></html>
"""
    path = root / "report.html"
    path.write_text(page)
    return path
