"""Scale targets of `rankscope analyze` (issue 17), each figure printed beside its target.

Makes its own synthetic checkpoints (random Gaussian weights, std 0.02, cached under benchmarks/.cache/scale):

- ``llama7b``: the LLaMA-7B shape (32 layers, d = 4096, 32 heads, 8 KV heads, d_ff 11008, vocab 32000), bf16,
  sharded (4 layers a shard) with a ``model.safetensors.index.json``, as Hugging Face ships it: 13.5 GB on disk.
- ``v3``: the DeepSeek-V3 shape (61 layers, hidden 7168, 128 heads, q_lora 1536, kv_lora 512, rope 64, nope 128,
  v 128; 3 dense layers of d_ff 18432, then 256 routed experts of 2048 and one shared expert), block-quantized
  FP8 (e4m3, one float32 inverse scale per 128×128 block, ``weight_scale_inv``) as DeepSeek ships it, one shard a
  layer. The full shape is ~690 GB; the shards are *sparse files*: every tensor is in the header at its real
  offset, but only the tensors ``analyze --experts sample:2`` reads hold data (attention, norms, router, shared
  and dense MLPs, and the two experts per layer that ``--experts sample:2`` draws); the other experts' bytes are
  holes, never read. About 25 GB are written.

Each measurement is one ``rankscope analyze`` process (import, read, analyse, write the rows; ``--no-figure``),
timed by wall clock, its peak RSS from ``getrusage(RUSAGE_CHILDREN)`` of a wrapper that runs only it. "Cold" runs
with an empty null cache (``RANKSCOPE_CACHE_DIR``), "warm" with the cache the cold run filled.

    .venv/bin/python benchmarks/scale.py                    # both shapes, every target (about an hour here)
    .venv/bin/python benchmarks/scale.py --only llama7b --layers 4   # a quick look: 4 layers, scaled ×8
    .venv/bin/python benchmarks/scale.py --device cuda      # the same on a GPU (benchmarks/gpu_scale.sh)

With ``--layers N`` below the full count the checkpoint has N layers and the times are also printed scaled to
the full depth (labelled "scaled"); the targets are judged on measured full-depth runs only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / ".cache" / "scale"
GiB = 2**30
STD = 0.02

LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
         "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 11008, "vocab_size": 32000,
         "num_hidden_layers": 32, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "torch_dtype": "bfloat16"}
V3 = {"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "hidden_size": 7168,
      "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512,
      "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128, "intermediate_size": 18432,
      "moe_intermediate_size": 2048, "n_routed_experts": 256, "n_shared_experts": 1, "first_k_dense_replace": 3,
      "num_experts_per_tok": 8, "vocab_size": 129280, "num_hidden_layers": 61, "rope_theta": 10000.0,
      "torch_dtype": "bfloat16",
      "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                              "weight_block_size": [128, 128]}}

# (name, target seconds, target peak RSS in GiB)
TARGETS = {("llama7b", "qk", "warm"): (60, 3), ("llama7b", "all", "warm"): (600, 3),
           ("llama7b", "all", "cold"): (600, 3), ("v3", "qk,ov", "warm"): (600, 4),
           ("v3", "qk,ov", "cold"): (600, 4)}

_DTYPE_NAMES = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float8_e4m3fn: "F8_E4M3"}


# ---------------------------------------------------------------------------------------------- writing


def _write_safetensors(path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...], object]]) -> int:
    """A safetensors file of ``entries`` (name, dtype, shape, make), in that order; ``make()`` returns the tensor,
    or None for a tensor left as a hole (zeros that take no disk space; never read here). Returns bytes written.

    Written by hand rather than with ``safetensors.torch.save_file`` because that needs every tensor in memory and
    cannot leave holes: the format is an 8-byte little-endian header length, the JSON header, then the data."""
    header, offset = {}, 0
    for name, dtype, shape, _ in entries:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data aligned to 8 bytes
    start, written = 8 + len(raw), 0
    tmp = path.with_suffix(".partial")
    with tmp.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, dtype, shape, make in entries:
            t = make()
            if t is None:
                continue
            assert t.dtype == dtype and tuple(t.shape) == tuple(shape), name
            f.seek(start + header[name]["data_offsets"][0])
            data = t.contiguous().view(torch.uint8).numpy().tobytes()
            f.write(data)
            written += len(data)
        f.truncate(start + offset)  # the holes up to the end
    tmp.replace(path)
    return written


def _gauss(*shape: int, dtype=torch.bfloat16, seed: int = 0):
    def make():
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(*shape, generator=g) * STD).to(dtype)
    return make


def _ones(*shape: int, dtype=torch.bfloat16):
    return lambda: torch.ones(*shape, dtype=dtype)


def _fp8(rows: int, cols: int, seed: int, keep: bool = True):
    """An FP8 weight of std 0.02 and its inverse-scale grid: w₈ = w / s with s = max|w| / 448 per 128×128 block
    (DeepSeek's scheme); both holes where not ``keep``."""
    grid = (-(-rows // 128), -(-cols // 128))
    cached = {}

    def both():
        if "w" not in cached:
            g = torch.Generator().manual_seed(seed)
            w = torch.randn(rows, cols, generator=g) * STD
            pad = torch.zeros(grid[0] * 128, grid[1] * 128)
            pad[:rows, :cols] = w
            blocks = pad.reshape(grid[0], 128, grid[1], 128)
            s = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12) / 448.0  # (grid)
            cached["w"] = (blocks / s[:, None, :, None]).reshape(pad.shape)[:rows, :cols].to(torch.float8_e4m3fn)
            cached["s"] = s
        return cached

    def weight():
        return both()["w"] if keep else None

    def scale():
        return both().pop("s") if keep else None

    return [(torch.float8_e4m3fn, (rows, cols), weight), (torch.float32, grid, scale)]


def _fp8_pair(prefix: str, seeds, name: str, rows: int, cols: int, keep: bool = True) -> list:
    """The entries of one FP8 weight ``prefix + name + ".weight"`` and its ``weight_scale_inv``."""
    (dt, shape, w), (st, grid, sc) = _fp8(rows, cols, next(seeds), keep)
    return [(f"{prefix}{name}.weight", dt, shape, w), (f"{prefix}{name}.weight_scale_inv", st, grid, sc)]


def make_llama(d: Path, layers: int) -> None:
    cfg = {**LLAMA, "num_hidden_layers": layers}
    h, H, kv, ff, vocab = 4096, 32, 8, 11008, 32000
    dh = h // H
    weight_map = {}
    per_shard = 4
    shards = [list(range(i, min(i + per_shard, layers))) for i in range(0, layers, per_shard)]
    n_files = len(shards) + 1
    for s, block in enumerate([None, *shards]):
        fname = f"model-{s + 1:05d}-of-{n_files:05d}.safetensors"
        entries = []
        if block is None:
            entries = [("model.embed_tokens.weight", torch.bfloat16, (vocab, h), _gauss(vocab, h, seed=1)),
                       ("model.norm.weight", torch.bfloat16, (h,), _ones(h)),
                       ("lm_head.weight", torch.bfloat16, (vocab, h), _gauss(vocab, h, seed=2))]
        else:
            for i in block:
                p = f"model.layers.{i}."
                shapes = {"self_attn.q_proj": (H * dh, h), "self_attn.k_proj": (kv * dh, h),
                          "self_attn.v_proj": (kv * dh, h), "self_attn.o_proj": (h, H * dh),
                          "mlp.gate_proj": (ff, h), "mlp.up_proj": (ff, h), "mlp.down_proj": (h, ff)}
                for j, (n, shape) in enumerate(shapes.items()):
                    entries.append((f"{p}{n}.weight", torch.bfloat16, shape, _gauss(*shape, seed=100 * i + j)))
                entries += [(f"{p}input_layernorm.weight", torch.bfloat16, (h,), _ones(h)),
                            (f"{p}post_attention_layernorm.weight", torch.bfloat16, (h,), _ones(h))]
        _write_safetensors(d / fname, entries)
        weight_map.update({name: fname for name, *_ in entries})
        print(f"  wrote {fname}", flush=True)
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (d / "config.json").write_text(json.dumps(cfg, indent=1))


def make_v3(d: Path, layers: int) -> None:
    from rankscope.analysis import _sampled

    cfg = {**V3, "num_hidden_layers": layers}
    h, H, dq, dc, dr, dn, dv = 7168, 128, 1536, 512, 64, 128, 128
    ff, moe, E, dense = 18432, 2048, 256, 3
    weight_map, written = {}, 0
    n_files = layers + 1
    for s in range(n_files):
        fname = f"model-{s + 1:05d}-of-{n_files:05d}.safetensors"
        if s == layers:
            entries = [("model.embed_tokens.weight", torch.bfloat16, (129280, h), _gauss(129280, h, seed=1)),
                       ("model.norm.weight", torch.bfloat16, (h,), _ones(h)),
                       ("lm_head.weight", torch.bfloat16, (129280, h), _gauss(129280, h, seed=2))]
        else:
            i, p, entries = s, f"model.layers.{s}.", []
            seeds = iter(range(10_000 * s, 10_000 * (s + 1)))
            fp8 = partial(_fp8_pair, p, seeds)

            entries += fp8("self_attn.q_a_proj", dq, h)
            entries.append((f"{p}self_attn.q_a_layernorm.weight", torch.bfloat16, (dq,), _ones(dq)))
            entries += fp8("self_attn.q_b_proj", H * (dn + dr), dq)
            entries += fp8("self_attn.kv_a_proj_with_mqa", dc + dr, h)
            entries.append((f"{p}self_attn.kv_a_layernorm.weight", torch.bfloat16, (dc,), _ones(dc)))
            entries += fp8("self_attn.kv_b_proj", H * (dn + dv), dc)
            entries += fp8("self_attn.o_proj", h, H * dv)
            if i < dense:
                entries += fp8("mlp.gate_proj", ff, h) + fp8("mlp.up_proj", ff, h) + fp8("mlp.down_proj", h, ff)
            else:
                entries.append((f"{p}mlp.gate.weight", torch.bfloat16, (E, h), _gauss(E, h, seed=next(seeds))))
                entries.append((f"{p}mlp.gate.e_score_correction_bias", torch.float32, (E,),
                                _ones(E, dtype=torch.float32)))
                read = set(_sampled(E, 2, i))
                for e in range(E):
                    keep = e in read
                    entries += (fp8(f"mlp.experts.{e}.gate_proj", moe, h, keep)
                                + fp8(f"mlp.experts.{e}.up_proj", moe, h, keep)
                                + fp8(f"mlp.experts.{e}.down_proj", h, moe, keep))
                entries += (fp8("mlp.shared_experts.gate_proj", moe, h) + fp8("mlp.shared_experts.up_proj", moe, h)
                            + fp8("mlp.shared_experts.down_proj", h, moe))
            entries += [(f"{p}input_layernorm.weight", torch.bfloat16, (h,), _ones(h)),
                        (f"{p}post_attention_layernorm.weight", torch.bfloat16, (h,), _ones(h))]
        written += _write_safetensors(d / fname, entries)
        weight_map.update({name: fname for name, *_ in entries})
        print(f"  wrote {fname} ({written / GiB:.1f} GiB of data so far)", flush=True)
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (d / "config.json").write_text(json.dumps(cfg, indent=1))


def checkpoint(shape: str, layers: int) -> Path:
    """The cached synthetic checkpoint of this shape and depth, made on first use."""
    d = CACHE / f"{shape}-{layers}"
    if (d / "config.json").exists():
        return d
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    t0 = time.perf_counter()
    print(f"making {d} ...", flush=True)
    (make_llama if shape == "llama7b" else make_v3)(d, layers)
    print(f"made {d} in {time.perf_counter() - t0:.0f} s", flush=True)
    return d


# ---------------------------------------------------------------------------------------------- measuring


_WRAPPER = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
            "rc = subprocess.run(sys.argv[1:]).returncode; w = time.perf_counter() - t; "
            "print('@@', rc, w, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True)")


def analyze(path: Path, kinds: str, cache: Path, extra: list[str]) -> tuple[float, float, str]:
    """(wall s, peak RSS GiB, last lines) of one ``rankscope analyze`` process."""
    rankscope = Path(sys.executable).with_name("rankscope")
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-c", _WRAPPER, str(rankscope), "analyze", str(path), "--out", out,
               "--no-figure", *(["--kinds", kinds] if kinds != "all" else []), *extra]
        env = {**os.environ, "RANKSCOPE_CACHE_DIR": str(cache)}
        run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    marks = [line for line in run.stdout.splitlines() if line.startswith("@@")]
    if not marks or marks[-1].split()[1] != "0":
        sys.exit(f"analyze failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    _, _, wall, rss_kib = marks[-1].split()
    tail = [line for line in run.stdout.splitlines() if "rows (" in line]
    return float(wall), int(rss_kib) / 2**20, tail[-1].strip() if tail else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=("llama7b", "v3"), action="append", help="one shape (default: both)")
    ap.add_argument("--layers", type=int, help="fewer layers than the real depth (times are then also scaled)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="rankscope analyze --jobs")
    ap.add_argument("--device", default=None, help="rankscope analyze --device (cuda, cpu, auto)")
    ap.add_argument("--warm-only", action="store_true", help="skip the cold runs (reuse the benchmark's cache)")
    ap.add_argument("--save", type=Path, help="write the figures to this JSON file (e.g. benchmarks/scale_cpu.json)")
    ap.add_argument("--against", type=Path, help="a --save file: print each figure's ratio to the one there")
    args = ap.parse_args()
    before = json.loads(args.against.read_text()) if args.against and args.against.exists() else {}
    extra = ["--jobs", str(args.jobs), *(["--device", args.device] if args.device else [])]
    print(f"benchmarks/scale.py: {os.cpu_count()} cores, jobs {args.jobs}, device {args.device or 'default'}, "
          f"torch {torch.__version__}", flush=True)
    results = []
    for shape in args.only or ("llama7b", "v3"):
        full = (LLAMA if shape == "llama7b" else V3)["num_hidden_layers"]
        layers = min(args.layers or full, full)
        path = checkpoint(shape, layers)
        cache = CACHE / f"nulls-{shape}"
        plans = [("qk", "warm"), ("all", "cold"), ("all", "warm")] if shape == "llama7b" else [
            ("qk,ov", "cold"), ("qk,ov", "warm")]
        per_kind = ["--experts", "sample:2"] if shape == "v3" else []
        for kinds, mode in plans:
            if mode == "cold":
                if args.warm_only:
                    continue
                shutil.rmtree(cache, ignore_errors=True)
            elif not cache.exists():  # a warm run needs a filled cache: fill it (untimed)
                analyze(path, kinds, cache, extra + per_kind)
            wall, rss, line = analyze(path, kinds, cache, extra + per_kind)
            results.append((shape, layers, full, kinds, mode, wall, rss, line))
            print(f"  {shape} {layers} layers, --kinds {kinds}, {mode}: {wall:.1f} s, peak RSS {rss:.2f} GiB "
                  f"({line})", flush=True)
    if args.save:
        args.save.write_text(json.dumps({f"{r[0]} {r[1]} {r[3]} {r[4]}": {"wall_s": r[5], "rss_gib": r[6]}
                                         for r in results}, indent=1) + "\n")
    print("\n| shape | layers | kinds | cache | wall | target | peak RSS | target |"
          + (" against | speed-up |" if before else ""))
    print("|---|---|---|---|---|---|---|---|" + ("---|---|" if before else ""))
    for shape, layers, full, kinds, mode, wall, rss, _ in results:
        t_wall, t_rss = TARGETS.get((shape, kinds, mode), (None, None))
        scaled = f" (×{full / layers:.1f} scaled: {wall * full / layers:.0f} s)" if layers < full else ""
        verdict = "" if t_wall is None or layers < full else (" ✓" if wall <= t_wall else f" ✗ {wall / t_wall:.2f}×")
        rss_verdict = "" if t_rss is None else (" ✓" if rss <= t_rss else f" ✗ {rss / t_rss:.2f}×")
        print(f"| {shape} | {layers} | {kinds} | {mode} | {wall:.1f} s{scaled}{verdict} | "
              f"{'' if t_wall is None else f'≤ {t_wall} s'} | {rss:.2f} GiB{rss_verdict} | "
              f"{'' if t_rss is None else f'≤ {t_rss} GiB'} |" + _against(before, shape, layers, kinds, mode, wall))


def _against(before: dict, shape: str, layers: int, kinds: str, mode: str, wall: float) -> str:
    """The ratio columns against a --save file (empty when there is none)."""
    if not before:
        return ""
    old = before.get(f"{shape} {layers} {kinds} {mode}")
    return f" {old['wall_s']:.1f} s | {old['wall_s'] / wall:.1f}× |" if old else " – | – |"


if __name__ == "__main__":
    main()
