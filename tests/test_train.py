"""The trainer: exact resume, checkpoints, kill -9 safety of the store, DDP, config overrides."""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rankscope.errors import InputError
from rankscope.store import RunStore
from rankscope.train import resolve, train
from rankscope.train.config import parse_pairs
from rankscope.train.trainer import get_batch, lr_at

TINY = dict(vocab_size=300, n_layer=2, d_model=32, n_head=2, kv_lora_rank=16, qk_rope_dim=4, max_seq_len=32,
            max_bytes=300_000, batch_size=4, steps=12, warmup_steps=3, eval_every=6, eval_batches=2, ckpt_every=6,
            monitor_every=4, threads=1, monitor_weights=False)


def tiny(**kw):
    return resolve("smoke", {**TINY, **kw})


def losses(run_dir: Path) -> dict[int, float]:
    frame = RunStore(run_dir).sql("select step, loss from train order by step")
    return dict(zip(frame["step"].astype(int), frame["loss"], strict=True))


def test_lr_schedule_is_warmup_then_cosine():
    cfg = tiny(steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4).train
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(55, cfg) == pytest.approx(1e-4 + 0.5 * 9e-4)  # half way down the cosine
    assert lr_at(100, cfg) == pytest.approx(1e-4)


def test_batches_depend_only_on_seed_step_and_rank():
    stream = np.arange(10_000, dtype=np.uint16)
    x1, y1 = get_batch(stream, 4, 16, seed=3, step=7)
    x2, _ = get_batch(stream, 4, 16, seed=3, step=7)
    x3, _ = get_batch(stream, 4, 16, seed=3, step=7, rank=1)
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    assert torch.equal(y1[:, :-1], x1[:, 1:])  # targets are the inputs shifted by one token


def test_interrupted_and_resumed_run_has_the_same_losses(tmp_path):
    cfg = tiny(attention="mla_decoupled")
    full = train(cfg, tmp_path / "full", progress=False)
    assert full.steps == 12 and not full.interrupted

    def stop_at_7(step, loss):
        return step == 7  # what Ctrl-C does: stop at the step boundary, with a checkpoint

    cut = train(cfg, tmp_path / "cut", progress=False, on_step=stop_at_7)
    assert cut.interrupted and cut.steps == 7
    assert (tmp_path / "cut" / "checkpoints" / "step_000007.safetensors").exists()
    resumed = train(cfg, tmp_path / "cut", resume=True, progress=False)
    assert resumed.steps == 12
    a, b = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert sorted(a) == sorted(b) == list(range(1, 13))  # every step once, none twice
    np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-6, atol=0)
    # the diagnoses after the resume match too (same weights, and the latent rms buffers were restored)
    q = 'select step, layer, head_index, kind, "null", outliers, stable_rank from attention order by all'
    fa, fb = RunStore(tmp_path / "full").sql(q), RunStore(tmp_path / "cut").sql(q)
    assert len(fa) == len(fb) > 0
    np.testing.assert_allclose(fa["stable_rank"], fb["stable_rank"], rtol=1e-6)


def test_a_run_directory_with_checkpoints_needs_resume(tmp_path):
    cfg = tiny(steps=6)
    train(cfg, tmp_path / "r", progress=False)
    with pytest.raises(InputError, match="--resume"):
        train(cfg, tmp_path / "r", progress=False)
    with pytest.raises(InputError, match="different model"):
        train(tiny(steps=6, d_model=64), tmp_path / "r", resume=True, progress=False)


def test_resume_skips_a_corrupt_newest_checkpoint(tmp_path):
    cfg = tiny(steps=12, keep_checkpoints=3)
    train(cfg, tmp_path / "r", progress=False)
    newest = tmp_path / "r" / "checkpoints" / "step_000012.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    from rankscope.nn import GPT
    from rankscope.rundir import RunDir

    model = GPT(cfg.model)
    assert RunDir(tmp_path / "r").load_checkpoint(model, None, "cpu") == 6


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "rankscope.cli", *args]


def _tiny_args(**kw) -> list[str]:
    args = []
    for key, value in {**TINY, **kw}.items():
        args += [f"--{key}", str(value)]
    return args


def test_kill_9_loses_only_unflushed_rows_and_resume_writes_no_key_twice(tmp_path):
    run = tmp_path / "killed"
    args = _cli("train", "--preset", "smoke", "--attention", "mha", "--run", str(run),
                *_tiny_args(steps=400, ckpt_every=20, monitor_every=10, eval_every=50))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    store = RunStore(run)
    try:
        while time.time() < deadline and proc.poll() is None:  # read the store while it is being written
            if "train" in store.tables() and len(store.steps("train")) >= 45:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    before = store.steps("train")
    assert len(before) >= 45
    assert not list((run / "metrics").glob("*.parquet")) or store.sql("select count(*) n from attention")["n"][0] > 0
    done = subprocess.run(_cli("train", "--preset", "smoke", "--attention", "mha", "--run", str(run), "--resume",
                               *_tiny_args(steps=60, ckpt_every=20, monitor_every=10, eval_every=50)),
                          env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    # resumed past the kill point (its steps ≤ 60 are all there) and wrote each key once
    keys = store.sql("select step, count(*) n from train group by step")
    assert set(keys["step"]) >= set(range(1, 61)) and keys["n"].max() == 1
    dup = store.sql('select step, layer, head_index, kind, "null", count(*) n from attention group by all having n > 1')
    assert dup.empty
    assert set(store.steps("qk")) >= set(range(0, 61, 10))


def test_linguistic_collapse_rows_on_a_fixed_probe_batch(tmp_path):
    train(tiny(steps=8, repr_every=4), tmp_path / "r", progress=False)
    frame = RunStore(tmp_path / "r").sql("select * from repr order by step")
    assert list(frame["step"]) == [4, 8]
    assert (frame["nc1"] > 0).all() and (frame["classes"] >= 2).all()
    assert ((frame["rankme"] >= 1) & (frame["rankme"] <= 32)).all()  # RankMe ≤ feature width d=32


def test_ddp_two_cpu_processes_on_gloo(tmp_path):
    run = tmp_path / "ddp"  # --out: torchrun's own parser would take --run as an abbreviation of --run-path
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "rankscope.cli", "train", "--preset", "smoke", "--attention", "gqa", "--out", str(run),
           *_tiny_args(steps=8, ckpt_every=8, monitor_every=4, eval_every=4)]
    done = subprocess.run(cmd, capture_output=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    store = RunStore(run)
    frame = store.sql("select step, count(*) n, max(loss) loss from train group by step order by step")
    assert list(frame["step"]) == list(range(1, 9)) and frame["n"].max() == 1  # only rank 0 writes
    assert all(math.isfinite(x) for x in frame["loss"])
    assert store.steps("qk") == {0, 4, 8}


def test_overrides_are_type_checked():
    cfg = resolve("cpu", parse_pairs(["--lr", "1e-3", "--n_layer=6", "--q_lora_rank", "none", "--max_bytes", "2e6",
                                      "--monitor_per_head", "false"]))
    assert cfg.train.lr == 1e-3 and cfg.model.n_layer == 6 and cfg.model.q_lora_rank is None
    assert cfg.train.max_bytes == 2_000_000 and cfg.train.monitor_per_head is False
    with pytest.raises(InputError, match="--lr"):
        resolve("cpu", {"lr": "fast"})
    with pytest.raises(InputError, match="no such setting"):
        resolve("cpu", {"learning_rate": "1"})
    with pytest.raises(InputError, match="n_layer"):
        resolve("cpu", {"n_layer": "2.5"})
    with pytest.raises(InputError, match="unknown preset"):
        resolve("huge")


def test_analyze_reads_a_run_directory_like_the_monitor_saw_the_model(tmp_path):
    import rankscope as rs

    train(tiny(attention="mla_decoupled", steps=8, monitor_weights=True), tmp_path / "r", progress=False)
    seen = RunStore(tmp_path / "r").sql('select layer, head_index, kind, outliers, stable_rank, bulk_edge '
                                        'from attention '
                                        'where step = 8 and "null" = \'product\' order by layer, head_index, kind')
    found = rs.analyze(tmp_path / "r", kinds=("qk", "ov"))
    found = found.sort_values(["layer", "head_index", "kind"]).reset_index(drop=True)
    assert len(found) == len(seen) > 0
    assert (found["outliers"].to_numpy() == seen["outliers"].to_numpy()).all()
    np.testing.assert_allclose(found["stable_rank"], seen["stable_rank"], rtol=1e-9)
    np.testing.assert_allclose(found["bulk_edge"], seen["bulk_edge"], rtol=1e-9)  # same ρ: buffers restored
    ckpt = tmp_path / "r" / "checkpoints" / "step_000008.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:200])
    from rankscope.errors import CheckpointError

    with pytest.raises(CheckpointError, match="step_000008"):
        rs.analyze(tmp_path / "r")


def test_train_and_sql_cli_bad_input_exit_2(tmp_path):
    from typer.testing import CliRunner

    from rankscope.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["train", "--preset", "smoke", "--lr", "fast", "--run", str(tmp_path / "r")])
    assert result.exit_code == 2 and "--lr" in result.output
    result = runner.invoke(app, ["train", "--preset", "smoke", "--attention", "rnn", "--run", str(tmp_path / "r")])
    assert result.exit_code == 2 and "unknown attention" in result.output
    result = runner.invoke(app, ["sql", str(tmp_path / "missing"), "select 1"])
    assert result.exit_code == 2 and "no such run directory" in result.output


def test_a_run_gives_the_callers_thread_counts_back(tmp_path):
    from threadpoolctl import threadpool_info, threadpool_limits

    def blas():
        return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]

    before_torch = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with threadpool_limits(2, user_api="blas"):
            seen = []
            train(tiny(steps=2, eval_every=2, ckpt_every=2), tmp_path / "r", progress=False,
                  on_step=lambda step, loss: seen.append((torch.get_num_threads(), blas())))
            assert seen and all(t == 1 and set(b) == {1} for t, b in seen)  # the run: threads=1
            assert torch.get_num_threads() == 2 and set(blas()) == {2}  # given back
    finally:
        torch.set_num_threads(before_torch)


def test_a_resumed_run_uses_the_thread_count_it_was_started_with(tmp_path, monkeypatch):
    import json

    from rankscope.train import trainer

    monkeypatch.setattr(trainer, "free_cores", lambda: 1)  # "auto" resolves to one thread on the first start
    stop_at_2 = lambda step, loss: step == 2  # noqa: E731 (stops the run as Ctrl-C does)
    train(tiny(threads=0, steps=4, ckpt_every=2, eval_every=2), tmp_path / "r", progress=False, on_step=stop_at_2)
    assert json.loads((tmp_path / "r" / "config.json").read_text())["train"]["threads"] == 1
    monkeypatch.setattr(trainer, "free_cores", lambda: 2)  # more cores are free now; the resumed run keeps 1
    seen = []
    train(tiny(threads=0, steps=4, ckpt_every=2, eval_every=2), tmp_path / "r", resume=True, progress=False,
          on_step=lambda step, loss: seen.append(torch.get_num_threads()))
    assert seen == [1, 1]


def test_monitor_schedule_is_dense_early_then_log_spaced_then_regular():
    from rankscope.train.config import monitor_schedule

    steps = monitor_schedule(600, 50, early=10)
    assert steps[:11] == list(range(11))  # every step of the first ten: onsets there are resolved
    middle = [s for s in steps if 10 < s < 50]
    ratios = np.diff(np.log(np.array([10, *middle], float)))
    assert middle and np.all(ratios > np.log(1.15)) and np.all(ratios < np.log(1.5))  # log-spaced (×1.3)
    assert [s for s in steps if s >= 50] == list(range(50, 601, 50))
    assert monitor_schedule(100, 25) == [0, 25, 50, 75, 100]  # no early part: the old grid
    assert monitor_schedule(110, 25)[-1] == 110 and monitor_schedule(10, 0) == []  # the last step; off


def test_offsets_and_sweep_reach_the_store_and_bad_offsets_fail_before_work(tmp_path):
    cfg = tiny(steps=4, monitor_every=4, monitor_early=1, monitor_offsets="0,-3", sweep="lr=0.002")
    train(cfg, tmp_path / "r", progress=False)
    rows = RunStore(tmp_path / "r").sql('select distinct step, head_index, kind, "offset", run, sweep from attention')
    assert set(rows["step"]) == {0, 1, 2, 3, 4}  # 0..early, then each ≥ 1 step and ≈ ×1.3 apart, up to the grid
    assert set(rows.loc[rows["head_index"] >= 0, "offset"]) == {0, -3}  # per-head qk forms at both offsets
    assert set(rows.loc[rows["head_index"] < 0, "offset"]) == {0}  # layer forms at 0 only
    assert set(rows.loc[rows["kind"] == "ov", "offset"]) == {0}
    assert set(rows["run"]) == {"lr=0.002/r"} and set(rows["sweep"]) == {"lr=0.002"}
    for bad in ("0,3", "-1", "0,-32", "0,x"):  # a key after the query, no 0, beyond the context, not a number
        with pytest.raises(InputError, match="monitor_offsets"):
            tiny(monitor_offsets=bad)
    assert not (tmp_path / "bad").exists()
