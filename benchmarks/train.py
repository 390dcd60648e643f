"""Training throughput and monitor overhead, measured side by side in one run.

1. Our decoder (MHA) vs Hugging Face ``LlamaForCausalLM`` with the same width, depth, heads, SwiGLU width
   and vocabulary: training tokens/s (forward, backward, AdamW step), interleaved in rounds so that a busy
   machine slows both alike. Target ≥ 0.9×.
2. Monitor overhead at ``every=50`` on the ``cpu`` preset: the wall time of one diagnosis (both nulls, per
   head and per layer, MLP and embedding matrices, Parquet flush) against 50 training steps. Target ≤ 2 %.
3. Steps/s of every attention variant at the ``cpu`` preset shapes.

    python benchmarks/train.py [--steps 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from rankscope.nn import GPT
from rankscope.train import resolve
from rankscope.train.monitor import Monitor


def _step_time(model, batch, steps: int, hf: bool) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = batch
    times = []
    for _ in range(steps + 2):
        t = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss if hf else model(x, y)[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return float(sorted(times[2:])[len(times[2:]) // 2])  # median, after warm-up


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = resolve("cpu", {"attention": "mha"})
    m = cfg.model
    B, T = cfg.train.batch_size, m.max_seq_len
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, m.vocab_size, (B, T), generator=g)
    batch = (x, torch.roll(x, -1, dims=1))

    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.d_ff,
                         num_hidden_layers=m.n_layer, num_attention_heads=m.n_head, num_key_value_heads=m.n_head,
                         max_position_embeddings=T, rms_norm_eps=m.norm_eps, tie_word_embeddings=m.tie_embeddings)
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    ours, theirs = GPT(m), LlamaForCausalLM(hf_cfg)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_theirs = sum(p.numel() for p in theirs.parameters())
    print(f"cpu preset shapes: d={m.d_model}, {m.n_layer} layers, {m.n_head} heads, d_ff={m.d_ff}, V={m.vocab_size}, "
          f"batch {B}×{T}, {args.threads} thread(s); parameters: ours {n_ours:,}, HF Llama {n_theirs:,}")
    a, b = [], []
    for _ in range(args.rounds):  # interleaved: machine load hits both
        a.append(_step_time(ours, batch, args.steps, hf=False))
        b.append(_step_time(theirs, batch, args.steps, hf=True))
    t_ours, t_hf = min(a), min(b)
    print(f"\n1. training tokens/s: ours {B * T / t_ours:,.0f}, HF LlamaForCausalLM {B * T / t_hf:,.0f}; "
          f"ratio ours/HF = {t_hf / t_ours:.2f}× (target ≥ 0.9×)")

    with tempfile.TemporaryDirectory() as run:
        mon = Monitor(ours, run, every=50, tensorboard=False, flush_seconds=float("inf"))
        mon.step(0)  # first call simulates (or loads) the nulls once per shape
        cold = mon.seconds
        calls, flushes = [], []
        for k in range(1, 4):
            before = mon.seconds
            mon.step(50 * k)
            calls.append(mon.seconds - before)
            t = time.perf_counter()
            mon.flush()  # one Parquet part per table, as the default does every 30 s and at checkpoints
            flushes.append(time.perf_counter() - t)
        per_call, flush = sorted(calls)[1], sorted(flushes)[1]
        train_50 = 50 * t_ours
        amortised = per_call + flush * train_50 / 30.0  # a flush every 30 s of training
        print(f"\n2. monitor at every=50: one diagnosis {per_call:.3f} s (first call {cold:.2f} s, nulls included), "
              f"one flush {flush:.3f} s, vs 50 steps {train_50:.1f} s → overhead "
              f"{100 * amortised / (train_50 + amortised):.2f} % of wall time with the default flush every 30 s, "
              f"{100 * (per_call + flush) / (train_50 + per_call + flush):.2f} % flushing at every diagnosis "
              "(target ≤ 2 %)")

    from rankscope.data import prepare
    from rankscope.train.trainer import get_batch

    data = prepare(cfg.train.data, m.vocab_size, cfg.train.max_bytes, cfg.train.val_percent)
    t = time.perf_counter()
    for step in range(1000):
        get_batch(data.train, B, T, seed=0, step=step)
    per_batch = (time.perf_counter() - t) / 1000
    print(f"\n   data: one batch from the memory-mapped stream {1e3 * per_batch:.3f} ms "
          f"= {100 * per_batch / t_ours:.3f} % of a training step")

    print("\n3. steps/s per variant (cpu preset, budgets matched by d_ff as in the study):")
    from rankscope.study import plan

    for spec in plan(Path("/tmp/unused"), "cpu", seeds=1):
        model = GPT(spec.config.model)
        t = _step_time(model, batch, args.steps, hf=False)
        print(f"   {spec.variant:<22} {1 / t:5.2f} steps/s  ({B * T / t:,.0f} tokens/s, "
              f"{sum(p.numel() for p in model.parameters()):,} parameters)")


if __name__ == "__main__":
    main()
