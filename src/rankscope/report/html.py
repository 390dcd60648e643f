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
from rankscope.report.verdict import CLAIMS, MIN_SEEDS, layer_series, verdict
from rankscope.rundir import read_study
from rankscope.vocab import PRODUCT, QK, REFERENCE_VARIANT

UNKNOWN_CONTEXT = 10**9  # a run without config.json: offsets Δ weighted (almost exactly) alike

CAPTIONS = {
    "loss": "Validation loss per variant, with the min–max band over seeds.",
    "layer_heatmaps": "Per variant, layer × step of the per-head query–key forms (causal-weighted over the offsets Δ, "
                      "mean over heads, then over seeds): spikes per head (grey where the bulk is not noise-shaped, "
                      "so there is no count), effective rank and top-10 % energy relative to the structure-matched "
                      "null of the same shape, and the share of seeds in which the layer is spiked (≥ 0.5 spikes per "
                      "head). One colour scale per metric across all variants.",
    "onsets": "Spike onset per layer: the first monitored step from which the layer is spiked at that step and the "
              "next, as a fraction of training; mean over seeds with its 95 % t-interval; layers without an onset "
              "are censored at 1.",
    "offsets": "The per-head forms at the last step read at each relative offset Δ (mean over layers, heads and "
               "seeds; 95 % t-intervals).",
    "carried": "Claim (ii): the drop of effective rank since initialisation, and the drop left in the bulk once the "
               "spikes are removed. If the spikes carry the collapse, the hatched bar is near zero.",
    "head_maps": "Spikes per (layer, head) at offset 0 at an early, a middle and the final monitored step (mean over "
                 "seeds, one colour scale).",
    "esd_steps": "Eigenvalue histogram of the spikiest head at the end, at three steps, with the fitted product "
                 "null's density and its bulk edge.",
    "layer_forms": "Secondary view: the layer-level forms (the sum over heads at offset 0, which has no functional "
                   "meaning under a per-head softmax): outliers under the product null and the naive MP fit, and "
                   "spikes.",
    "sweep": "The comparison at each value of the sweep axis.",
}

STATS_HTML = """<details><summary>How the verdict is reached</summary><ul>
<li>The primary forms are per head, at equal head width dh across variants (the decoupled variants' query–key
forms add the rope width dr, so their rank is dh + dr), read at several relative offsets Δ
(<code>B_h(Δ) = Wq_hᵀ R_Δ Wk_h</code> and its decoupled/PreRoPE analogues) and averaged with causal weights
w(Δ): the share of the query–key pairs of a causal context of T that the offsets nearest Δ hold (Σ T − |Δ'|
over its bin); heads are averaged within a layer.</li>
<li>Rank-fair quantities: <b>spikes</b> (eigenvalues above the spectrum's own noise bulk, counted sequentially),
<b>spikes per unit of rank</b> in the comparisons, <b>effective rank ÷ the null's</b> (the structure-matched
null of the same shape: 1 = noise-like) and <b>top-10 %
energy ÷ the null's</b> (above 1 = concentrated). "More collapsed" is claimed only where all three agree.</li>
<li>Every test has an effect-size margin fixed before the data. It reads <i>reproduced</i> when its t-interval over
seeds lies beyond the margin in the claimed direction, <i>not reproduced</i> when the interval lies inside the
margin (an equivalence test) or on the other side of zero, else <i>inconclusive</i>. A claim is reproduced when
every part is and its intersection–union p (the largest of its parts') survives Holm across the claims; it is not
reproduced when some part is, with Holm across every part. Differences from {reference} are paired by seed; the
SD of an onset statistic is at least the monitoring grid's rounding error. The negative controls below show what
the rule says when nothing is there. Heads whose bulk is not noise-shaped have no spike count: the share of such
heads is reported ("uncounted"), and their rank drop is left to the bulk.</li>
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
table { border-collapse: collapse; margin: 1em 0; font-size: 0.85em; max-width: 100%; }
td.n { white-space: nowrap; } td.s { min-width: 22em; } table.v { font-size: 0.78em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
.reproduced { background: #d7f5d7; } .not { background: #f8d6d6; } .inconclusive { background: #f5f0d0; }
.warn { background: #fde8c8; padding: 6px 10px; border-left: 4px solid #e8a33a; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; } code, pre { background: #f6f6f6; padding: 0.1em 0.3em; }
pre { padding: 0.8em; overflow-x: auto; font-size: 0.8em; }
</style>"""


def _num(x, digits: int = 3) -> str:
    return "–" if x is None or not math.isfinite(float(x)) else f"{float(x):.{digits}g}"


def _ci(stat: dict | None) -> str:
    """"mean [low, high]" from a t_interval dict, never wrapped mid-number."""
    if not stat or stat.get("mean") is None:
        return "–"
    return f"{_num(stat['mean'])} [{_num(stat.get('low'), 2)}, {_num(stat.get('high'), 2)}]"


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
    tr = data.train
    final = tr.dropna(subset=["val_loss"]).sort_values("step").groupby(["sweep", "name"]).tail(1) \
        if not tr.empty and "val_loss" in tr else pd.DataFrame(columns=["sweep", "name", "val_loss"])
    first = tr.sort_values("step").groupby(["sweep", "name"]).head(1) if not tr.empty and "loss" in tr \
        else pd.DataFrame(columns=["sweep", "name", "loss"])
    runs = runs.merge(final[["sweep", "name", "val_loss"]], on=["sweep", "name"], how="left")
    runs = runs.merge(first[["sweep", "name", "loss"]], on=["sweep", "name"], how="left")

    def one(values: pd.Series) -> str:  # the same for every seed of a variant; absent for a lone run
        values = values.dropna()
        return f"{int(values.iloc[0]):,}" if len(values) else "–"

    rows = [f"<tr><td class=l>{html.escape(sweep)}</td><td class=l>{html.escape(variant)}</td><td>{len(g)}</td>"
            f"<td>{one(g['params'])}</td><td>{one(g['kv_cache_floats_per_token'])}</td>"
            f"<td class=n>{g['loss'].mean():.2f}</td>"
            f"<td class=n>{g['val_loss'].mean():.3f} ± {g['val_loss'].std(ddof=0):.3f}</td></tr>"
            for (sweep, variant), g in runs.groupby(["sweep", "variant"], sort=False)]
    return ("<table><tr><th class=l>sweep</th><th class=l>variant</th><th>seeds</th><th>parameters</th>"
            "<th>KV-cache floats / token</th><th>training loss at step 1</th><th>final validation loss "
            "(mean ± sd)</th></tr>" + "".join(rows) + "</table>")


def _unfinished(data: StudyData) -> str:
    missing = len(data.meta["runs"]) - len(data.runs)
    if missing <= 0:
        return ""
    return (f"<p><b>{missing} of {len(data.meta['runs'])} runs are not finished</b> and are left out of every "
            "figure and statistic below; re-run the study command to finish them.</p>")


def _cls(reading: str) -> str:
    return "reproduced" if reading == "reproduced" else "not" if reading.startswith("not") else "inconclusive"


def _claims_html(point: dict) -> str:
    rows = []
    for key, claim in point["claims"].items():
        v = claim["verdict"]
        extra = ""
        if key == "iii" and claim.get("at_equal_loss"):
            extra = f"<br><small>at equal validation loss: {html.escape(claim['at_equal_loss'])}</small>"
        evidence = "".join(f"<li>{html.escape(e)}</li>" for e in claim["evidence"])
        rows.append(f"<tr><td class=l>({key}) {html.escape(CLAIMS[key])}</td><td class='l {_cls(v)}'>{v}{extra}</td>"
                    f"<td class='l s'><ul>{evidence}</ul></td></tr>")
    short = point.get("scale", {}).get("too_small")
    warning = (f"<p class=warn><b>Too small to conclude</b> ({html.escape(', '.join(short))}): these verdicts are "
               "a check that the pipeline runs, not findings about the paper's claims. Use --preset cpu (or paper) "
               "for a verdict.</p>") if short else ""
    return (warning + "<table><tr><th class=l>claim</th><th class=l>verdict</th><th class=l>evidence</th></tr>"
            + "".join(rows) + "</table>")


def _tests_html(point: dict) -> str:
    rows = []
    for t in point["tests"]:
        p = t.get("p_holm") or {}
        rows.append(f"<tr><td class=l>({t['claim']})</td><td class='l s'>{html.escape(t['sentence'])}"
                    f"{'' if t['primary'] else ' <small>(equal validation loss; not in the verdict)</small>'}</td>"
                    f"<td class=n>{_ci({'mean': t['estimate'], 'low': t['low'], 'high': t['high']})}</td>"
                    f"<td>{t['n']}</td><td class=n>{t['direction']} {_num(t['null_value'])} ± {_num(t['margin'])}</td>"
                    f"<td>{_num(p.get('reproduce'), 2)}</td><td>{_num(p.get('equivalent'), 2)}</td>"
                    f"<td>{_num(p.get('opposite'), 2)}</td><td class='l {_cls(t['reading'])}'>{t['reading']}</td></tr>")
    return ("<details><summary>Every test (estimate with its 95 % t-interval over seeds; Holm-adjusted p-values)"
            "</summary><table><tr><th class=l>claim</th><th class=l>test</th><th>estimate [95 % CI]</th><th>seeds</th>"
            "<th>direction, null ± margin</th><th>p reproduce</th><th>p equivalent</th><th>p opposite</th>"
            "<th class=l>reading</th></tr>" + "".join(rows) + "</table></details>")


VARIANT_TABLES = [  # two tables of a few columns each, so that both fit the page at 1280 px
    [("spikes", "spikes per head"), ("spikes_per_rank", "spikes ÷ rank"), ("uncounted", "uncounted"),
     ("erank_vs_null", "eff. rank ÷ null's"),
     ("top_energy_vs_null", "top-10 % energy ÷ null's"), ("equal_loss_step", "step at equal loss"),
     ("erank_vs_null_at_equal_loss", "eff. rank ÷ null's at equal loss")],
    [("early", "median onset"), ("layer_specificity", "layer ÷ seed variance"), ("propagation", "onset–depth ρ"),
     ("persistence", "persistence"), ("erank_drop", "eff.-rank drop"), ("spike_share", "drop carried by spikes"),
     ("lead", "rank-drop onset − spike onset")],
]


def _variants_html(point: dict) -> str:
    out = []
    for stats in VARIANT_TABLES:
        head = "".join(f"<th>{html.escape(label)}</th>" for _, label in stats)
        rows = []
        for variant in figs.ORDER:
            values = point["variants"].get(variant)
            if values is None:
                continue
            rows.append(f"<tr><td class=l>{html.escape(variant)}</td>"
                        + "".join(f"<td class=n>{_ci(values.get(s))}</td>" for s, _ in stats) + "</tr>")
        out.append("<table class=v><tr><th class=l>variant</th>" + head + "</tr>" + "".join(rows) + "</table>")
    return "".join(out)


def _controls_html(controls: dict | None) -> str:
    if not controls:
        return ""
    rows = []
    for sim in controls.get("simulated", []):
        for case, label in (("no_effect", "no effect"), ("boundary", "effect at the margin")):
            shares = sim[case]
            cells = "".join(f"<td class=n>{100 * shares[k]['reproduced']:.1f} % / "
                            f"{100 * shares[k]['not reproduced']:.1f} %</td>" for k in ("i", "ii", "iii"))
            rows.append(f"<tr><td class=l>{html.escape(sim['sweep'])}: {sim['studies']} simulated studies, {label} "
                        f"({sim['seeds']} seeds)</td>{cells}</tr>")
    for perm in controls.get("permuted", []):
        if not perm.get("permutations"):
            continue
        iii, early = perm["iii"], perm["i: earlier onset"]
        rows.append(f"<tr><td class=l>{html.escape(perm['sweep'])}: this study's runs, variant labels permuted "
                    f"within seeds ({perm['permutations']} permutations)</td><td class=n>earlier onset: "
                    f"{100 * early['reproduced']:.1f} % / {100 * early['not reproduced']:.1f} %</td><td>–</td>"
                    f"<td class=n>{100 * iii['reproduced']:.1f} % / {100 * iii['not reproduced']:.1f} %</td></tr>")
    for key, label in (("spike_free", "spike-free, smoothly decaying synthetic runs"),
                       ("known_effect", "known-effect synthetic study")):
        if key in controls:
            v = controls[key]["verdicts"]
            rows.append(f"<tr><td class=l>{label}</td>" + "".join(f"<td class='{_cls(v[k])}'>{v[k]}</td>"
                                                                   for k in ("i", "ii", "iii")) + "</tr>")
    return ("<h3>Negative controls: the same rule where the answer is known</h3><p>Simulated rows: share of "
            "studies read reproduced / not reproduced. With no effect, reproduced must stay ≤ 5 %; there, "
            "not reproduced is the correct (equivalence) answer. At the margin both must stay ≤ 5 %.</p><table>"
            "<tr><th class=l>control</th><th>(i)</th><th>(ii)</th><th>(iii)</th></tr>" + "".join(rows) + "</table>"
            + f"<p><small>{html.escape(controls.get('notes', ''))}</small></p>")


def _offsets_html(point: dict) -> str:
    per = point.get("per_offset") or {}
    deltas = sorted({int(d) for v in per.values() for d in v}, key=abs)
    if len(deltas) < 2:
        return ""
    head = "".join(f"<th>Δ = {d}</th>" for d in deltas)
    rows = []
    for variant in figs.ORDER:
        if variant not in per:
            continue
        rows.append(f"<tr><td class=l>{html.escape(variant)}</td>" + "".join(
            f"<td class=n>{_ci(per[variant].get(d, {}).get('erank_vs_null'))}</td>" for d in deltas) + "</tr>")
    return ("<p>Effective rank ÷ the null's at the last step, per offset Δ:</p><table class=v><tr>"
            "<th class=l>variant</th>" + head + "</tr>" + "".join(rows) + "</table>")


def _attribution_html(point: dict) -> str:
    rows = point.get("attribution") or []
    if not rows:
        return ""
    cols = [("spikes_per_rank", "spikes ÷ rank"), ("erank_vs_null", "eff. rank ÷ null's"),
            ("top_energy_vs_null", "top-10 % energy ÷ null's"), ("erank_vs_null_at_equal_loss",
                                                                  "eff. rank ÷ null's at equal loss")]
    body = "".join(f"<tr><td class=l>{html.escape(r['contrast'])}</td><td class=l>{html.escape(r['a'])} − "
                   f"{html.escape(r['b'])}</td>" + "".join(f"<td class=n>{_ci(r.get(c))}</td>" for c, _ in cols)
                   + "</tr>" for r in rows)
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in cols)
    return ("<h3>Attribution: what each single design change does (paired differences at the last step, "
            "95 % t-intervals; descriptive)</h3><table class=v><tr><th class=l>change</th><th class=l>contrast</th>"
            + head + "</tr>" + body + "</table>")


def _verdict_html(summary: dict) -> str:
    parts = []
    for point in summary["points"]:
        parts.append(f"<h3>Sweep point: {html.escape(point['sweep'])}</h3>{_claims_html(point)}{_tests_html(point)}"
                     f"<h3>Per variant (mean [95 % t-interval] over seeds, at the last step unless named)</h3>"
                     f"{_variants_html(point)}{_offsets_html(point)}{_attribution_html(point)}")
    parts.append(_controls_html(summary.get("negative_controls")))
    return "\n".join(parts)


def _cells(data: StudyData) -> pd.DataFrame:
    """The primary forms: per-head query–key rows under the structure-matched null, every offset."""
    a = data.attention
    return a[(a["kind"] == QK) & (a["head_index"] >= 0) & (a["null"] == PRODUCT)]


def _figures(data: StudyData, series: pd.DataFrame, point: dict | None, sweep: str, out: Path) -> str:
    total = int(data.runs.loc[data.runs["sweep"] == sweep, "steps"].max())
    paths = [figs.loss_curves(data, sweep, out), figs.layer_heatmaps(series, sweep, out, total)]
    if point is not None:
        paths += [figs.onsets(point, out), figs.offsets(point, out), figs.carried(point, out)]
    paths += [figs.head_maps(data, sweep, out), figs.esd_steps(data, sweep, out),
              figs.layer_forms(data, sweep, out, total)]
    return "".join(f"<figure>{_img(p)}<figcaption>{html.escape(CAPTIONS[p.stem])}</figcaption></figure>"
                   for p in paths if p is not None)


def write_report(root: str | Path) -> Path:
    """Figures, ``summary.json`` and ``report.html`` in ``root``: a study (the claims, their verdict and negative
    controls) or a single run (its spectra through training, no claims)."""
    data = load(root)
    root = Path(root)
    out = root / "figures"
    # the context sets the causal weights of the offsets; a monitored run without config.json weighs them alike
    runs = data.runs.assign(context=[int(c["model"]["max_seq_len"]) if c else UNKNOWN_CONTEXT
                                     for c in data.runs["config"]])
    cells = _cells(data)
    series = layer_series(cells, runs)
    is_study = read_study(root) is not None
    summary: dict = {"command": data.meta.get("command"), "seconds": data.meta.get("seconds"),
                     "runs": [{k: r.get(k) for k in ("name", "sweep", "variant", "seed", "params",
                                                     "kv_cache_floats_per_token", "config")}
                              for r in data.meta["runs"]]}
    if is_study:
        summary.update(verdict(cells, data.train, runs))
    (root / "summary.json").write_text(json.dumps(_json_safe(summary), indent=1) + "\n")
    points = {p["sweep"]: p for p in summary.get("points", [])}
    sections = []
    for sweep in sorted(data.runs["sweep"].unique()):
        body = _figures(data, series, points.get(sweep), sweep, out / sweep.replace("/", "_"))
        sections.append(f"<h2>Figures — {html.escape(sweep)}</h2>{body}")
    if is_study:
        per_run = pd.DataFrame([r for p in summary["points"] for r in p["per_run"]])
        sweep_fig = figs.sweep_summary(per_run, out)
        if sweep_fig is not None:
            sections.insert(0, f"<h2>Sweep</h2><figure>{_img(sweep_fig)}<figcaption>{CAPTIONS['sweep']}"
                               "</figcaption></figure>")
    command = data.meta.get("command") or f"rankscope report {root}"
    configs = {r["name"] + ("" if r["sweep"] == "base" else f" ({r['sweep']})"): r["config"]
               for r in data.meta["runs"]}
    wall = data.meta.get("seconds")
    wall = f" Training took {wall / 60:.0f} min of wall time." if wall else ""
    if is_study:
        intro = f"""<p>Reproduces the comparison of Jha &amp; Reagen, <i>A Random Matrix Theory Perspective on the
Learning Dynamics of Multi-head Latent Attention</i> (arXiv 2507.09394), with a design that separates latent
compression, the way RoPE is applied and rope-key sharing. Verdicts need at least {MIN_SEEDS} seeds.{wall}</p>"""
        verdict_html = (f"<h2>Verdict</h2>{STATS_HTML.format(reference=html.escape(REFERENCE_VARIANT))}"
                        f"{_verdict_html(summary)}")
        title = f"Rank collapse in attention: {html.escape(root.name)}"
    else:
        intro = "<p>One training run: the spectra of its attention heads through training (no claims).</p>"
        verdict_html = ""
        title = f"Attention spectra through training: {html.escape(root.name)}"
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>rankscope report: {html.escape(root.name)}</title>
{_STYLE}</head><body>
<h1>{title}</h1>
{intro}
<p>Reproduce with: <code>{html.escape(command)}</code></p>
<h2>Runs</h2>{_runs_table(data)}{_unfinished(data)}
{verdict_html}
{''.join(sections)}
<h2>Configurations</h2><details><summary>resolved config of every run</summary>
<pre>{html.escape(json.dumps(configs, indent=1))}</pre></details>
{_CHECK}
</body></html>
"""
    path = root / "report.html"
    path.write_text(page)
    return path
