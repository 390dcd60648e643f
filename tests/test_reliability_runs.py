"""Reliability of training runs: one writer per run, every setting checked before work, resume keeps the run's
config and identity, studies are relocatable, the data cache heals, and every bad input is one line and exit 2.

The runs are tiny (2 layers of width 32, 4 steps, a generated corpus of 170 kB) and share one partial run, trained
once and copied, so the file takes seconds."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import rankscope.cli
from privileges import as_a_plain_user
from rankscope.cli import app
from rankscope.data import prepare
from rankscope.errors import CheckpointError, InputError
from rankscope.report.data import load
from rankscope.rundir import RunDir, read_study, write_study
from rankscope.store import RunStore
from rankscope.study import plan, run_study
from rankscope.train import resolve, train

TINY = dict(vocab_size=300, n_layer=2, d_model=32, n_head=2, kv_lora_rank=16, qk_rope_dim=4, max_seq_len=32,
            max_bytes=None, batch_size=4, steps=4, warmup_steps=1, eval_every=2, eval_batches=1, ckpt_every=2,
            monitor_every=2, monitor_per_head=False, monitor_weights=False, repr_every=0, threads=1)
runner = CliRunner()


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setattr(rankscope.cli.console, "width", 200)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small single-file corpus: enough distinct pairs for a 300-token BPE, tokenized in a fraction of a second."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("".join(f"def f_{i}(x, y):\n    return x * {i % 97} + y ** {i % 5}  # line {i}\n"
                            for i in range(3000)))
    return path


def tiny(corpus: Path, **kw):
    return resolve("smoke", {**TINY, "data": str(corpus), **kw})


def tiny_args(corpus: Path, **kw) -> list[str]:
    out = ["--preset", "smoke", "--attention", "mha"]
    for key, value in {**TINY, "data": str(corpus), **kw}.items():
        out += [f"--{key}", str(value)]
    return out


@pytest.fixture(scope="module")
def partial(corpus, tmp_path_factory) -> Path:
    """A run stopped (as Ctrl-C does) at step 2 of 4: a checkpoint at 2, rows at steps 0 and 2."""
    run = tmp_path_factory.mktemp("runs") / "partial"
    result = train(tiny(corpus), run, progress=False, on_step=lambda step, loss: step == 2)
    assert result.interrupted and RunDir(run).steps() == [2]
    return run


def copy_run(partial: Path, dest: Path) -> Path:
    shutil.copytree(partial, dest)
    return dest


def error_lines(output: str) -> list[str]:
    """The CLI's error lines; a traceback would show as more text after ``error:`` or as 'Traceback'."""
    assert "Traceback" not in output, output
    return [line for line in output.splitlines() if "error:" in line]


def one_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = error_lines(result.output)
    assert len(lines) == 1, result.output
    return lines[0]


# ---- one writer per run ----------------------------------------------------------------------------------------

HOLDER = """
import sys
from rankscope.rundir import RunDir
with RunDir(sys.argv[1]).lock():
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_second_trainer_on_a_locked_run_exits_2_naming_the_holder_and_writes_nothing(partial, corpus, tmp_path):
    run = copy_run(partial, tmp_path / "r")
    before = {p.relative_to(run): p.stat().st_mtime_ns for p in run.rglob("*") if p.name != "train.lock"}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        line = one_error(runner.invoke(app, ["train", *tiny_args(corpus), "--run", str(run), "--resume"]))
        assert f"pid {holder.pid} on {socket.gethostname()}" in line and "another trainer" in line
        with pytest.raises(InputError, match=f"pid {holder.pid}"):  # the Python API too
            train(tiny(corpus), run, resume=True, progress=False)
        after = {p.relative_to(run): p.stat().st_mtime_ns for p in run.rglob("*") if p.name != "train.lock"}
        assert after == before  # the refused trainer wrote nothing: no config, checkpoint or store part
        holder.kill()  # kill -9: the OS releases the lock with the process
        holder.wait()
    finally:
        if holder.poll() is None:
            holder.kill()
    with RunDir(run).lock():  # free again, without anyone removing a stale file
        assert f"pid {os.getpid()}" in (run / "train.lock").read_text()
        with pytest.raises(InputError, match=f"pid {os.getpid()}"):  # a second holder in this process is refused too
            with RunDir(run).lock():
                pass
    result = train(tiny(corpus), run, resume=True, progress=False)
    assert result.steps == 4


# ---- every setting checked before work -------------------------------------------------------------------------

CORES = os.cpu_count()
BAD = [  # (field, value, what the message must say about the allowed range)
    ("grad_clip", "-1", "≥ 0"), ("grad_clip", "inf", "finite"), ("ckpt_every", "-1", "≥ 1"), ("ckpt_every", "0", "≥ 1"),
    ("monitor_every", "-3", "≥ 0"), ("steps", "-5", "≥ 1"), ("amp", "fp16", "auto, bf16, off"),
    ("threads", "1000", f"1..{CORES} (this machine has {CORES} cores)"), ("threads", "-1", f"1..{CORES}"),
    ("lr", "-1", "> 0"), ("lr", "nan", "> 0"), ("batch_size", "0", "≥ 1"), ("eval_every", "0", "≥ 1"),
    ("eval_batches", "0", "≥ 1"), ("device", "tpu", "auto, cpu, cuda, cuda:N, mps"),
    ("fpr", "0", "[0.0001, 0.5]"), ("fpr", "1", "[0.0001, 0.5]"), ("fpr", "nan", "[0.0001, 0.5]"),
    ("fpr", "1e-9", "[0.0001, 0.5]"), ("weight_decay", "-0.1", "≥ 0"), ("warmup_steps", "-1", "≥ 0"),
    ("min_lr", "0.01", "[0, lr]"), ("beta1", "1", "[0, 1)"), ("beta2", "-0.1", "[0, 1)"), ("seed", "-1", "[0, 2**63)"),
    ("keep_checkpoints", "0", "≥ 1"), ("val_percent", "0", "(0, 100)"), ("max_bytes", "0", "positive"),
    ("monitor_early", "-1", "≥ 0"), ("repr_every", "-2", "≥ 0"), ("vocab_size", "100", "[257, 65536]"),
    ("n_head", "3", "does not divide d_model"), ("n_layer", "0", "positive"), ("d_model", "-32", "positive"),
    ("head_dim", "7", "positive even"), ("init_std", "inf", "finite"), ("norm_eps", "nan", "finite"),
    ("monitor_offsets", "0,5", "0 ≥ Δ"),
]


@pytest.mark.parametrize(("field", "value", "allowed"), BAD, ids=[f"{f}={v}" for f, v, _ in BAD])
def test_a_setting_out_of_range_is_refused_with_its_range(field, value, allowed):
    with pytest.raises(InputError) as err:
        resolve("smoke", {**TINY, field: value})
    assert field in str(err.value) and allowed in str(err.value), str(err.value)


def test_settings_on_the_edges_of_their_ranges_are_accepted():
    cfg = resolve("smoke", {**TINY, "fpr": "0.5", "grad_clip": "0", "monitor_every": "0", "warmup_steps": "0",
                            "min_lr": "2e-3", "lr": "2e-3", "beta1": "0", "threads": str(CORES), "device": "cuda:3",
                            "amp": "off", "weight_decay": "0", "seed": "0"})
    assert cfg.train.fpr == 0.5 and cfg.train.threads == CORES and cfg.train.device == "cuda:3"
    assert resolve("smoke", {**TINY, "fpr": "1e-4", "device": "mps", "threads": "0"}).train.fpr == 1e-4


def test_the_python_api_and_the_cli_check_settings_before_any_work(corpus, tmp_path):
    cfg = tiny(corpus)
    for bad in (dict(grad_clip=-1.0), dict(fpr=float("nan")), dict(steps=0), dict(device="tpu")):
        with pytest.raises(InputError, match=next(iter(bad))):
            train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **bad)), tmp_path / "api",
                  progress=False)
    assert not (tmp_path / "api").exists()
    for flag, value in (("--grad_clip", "-1"), ("--device", "tpu"), ("--threads", "1000")):
        line = one_error(runner.invoke(app, ["train", *tiny_args(corpus), flag, value, "--run", str(tmp_path / "c")]))
        assert flag in line
    assert not (tmp_path / "c").exists()


def test_study_options_are_checked_before_any_work(corpus, tmp_path):
    out = tmp_path / "s"
    for kwargs, message in ((dict(seeds=0), "--seeds"), (dict(seeds=1000), "--seeds"), (dict(seeds=True), "--seeds"),
                            (dict(sweep="seed=1,2"), "sets seed per run"),
                            (dict(sweep="attention=mha,gqa"), "sets attention per run"),
                            (dict(sweep="lr=1e-3,1e-3"), "repeated"), (dict(sweep="data=/a,/b"), "directory name"),
                            (dict(sweep="lr=-1,1e-3"), "--lr must be"), (dict(variants=["mha", "mha"]), "repeated")):
        with pytest.raises(InputError, match=message):
            plan(out, "smoke", **{"seeds": 1, **kwargs})
    specs = plan(out, "smoke", seeds=1, variants=["mha"], overrides={**TINY, "data": str(corpus)})
    for jobs in (0, CORES + 1):
        with pytest.raises(InputError, match=f"--jobs must be 1..{CORES}"):
            run_study(out, specs, jobs=jobs, log=lambda line: None)
    result = runner.invoke(app, ["study", "--preset", "smoke", "--out", str(out), "--jobs", "0"])
    assert "--jobs" in one_error(result)
    assert not out.exists()  # nothing planned on disk, nothing trained


# ---- resume keeps the run's config and identity ---------------------------------------------------------------

def test_resuming_with_other_settings_is_refused_naming_each_change(partial, corpus, tmp_path):
    run = copy_run(partial, tmp_path / "r")
    saved = (run / "config.json").read_bytes()
    with pytest.raises(InputError) as err:
        train(tiny(corpus, seed=1, lr=1e-3, fpr=0.05), run, resume=True, progress=False)
    message = str(err.value)
    assert "different training config" in message and "--force" in message
    assert "seed: 0 → 1" in message and "lr: 0.002 → 0.001" in message and "fpr: 0.01 → 0.05" in message
    with pytest.raises(InputError) as err:
        train(tiny(corpus, d_ff=64), run, resume=True, progress=False)
    assert "different model config" in str(err.value) and "d_ff: 96 → 64" in str(err.value)
    assert (run / "config.json").read_bytes() == saved and RunDir(run).steps() == [2]
    line = one_error(runner.invoke(app, ["train", *tiny_args(corpus, seed=1), "--run", str(run), "--resume"]))
    assert "seed: 0 → 1" in line
    # the step budget, threads, device and checkpoint cadence may change: the same run, computed elsewhere or longer
    result = train(tiny(corpus, steps=6, ckpt_every=3, threads=0, device="cpu"), run, resume=True, progress=False)
    assert result.steps == 6
    keys = RunStore(run).sql("select step, count(*) n from train group by step order by step")
    assert list(keys["step"]) == [1, 2, 3, 4, 5, 6] and keys["n"].max() == 1


def test_force_resumes_with_the_new_settings_and_saves_them(partial, corpus, tmp_path):
    run = copy_run(partial, tmp_path / "r")
    result = runner.invoke(app, ["train", *tiny_args(corpus, seed=1), "--run", str(run), "--resume", "--force"])
    assert result.exit_code == 0, result.output
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["seed"] == 1 and saved["run_id"] == partial.name and RunDir(run).finished()


def test_a_renamed_run_resumes_under_the_id_its_rows_have(partial, corpus, tmp_path):
    assert RunDir(partial).run_id() == "partial"  # a new run's id is its name at creation
    run = copy_run(partial, tmp_path / "renamed")
    train(tiny(corpus), run, resume=True, progress=False)
    store = RunStore(run)
    assert set(store.sql("select distinct run from train")["run"]) == {"partial"}
    assert set(store.sql("select distinct run from attention")["run"]) == {"partial"}
    keys = store.sql("select step, count(*) n from train group by step order by step")
    assert list(keys["step"]) == [1, 2, 3, 4] and keys["n"].max() == 1  # no step written twice under a new name
    per_step = store.sql("select step, count(*) n from attention group by step order by step")
    assert list(per_step["step"]) == [0, 2, 4] and per_step["n"].nunique() == 1  # step 2 diagnosed once
    # a run of an earlier version (no run_id saved) keeps the one tag its rows have; a new one, its name
    old = copy_run(partial, tmp_path / "old-renamed")
    config = json.loads((old / "config.json").read_text())
    del config["run_id"]
    (old / "config.json").write_text(json.dumps(config))
    train(tiny(corpus), old, resume=True, progress=False)
    assert set(RunStore(old).sql("select distinct run from train")["run"]) == {"partial"}
    assert RunDir(old).run_id() == "partial"


def test_a_copied_study_reads_its_copies_and_an_old_plan_its_absolute_paths(partial, corpus, tmp_path):
    study = tmp_path / "study"
    (spec,) = plan(study, "smoke", seeds=1, variants=["mha"], overrides={**TINY, "data": str(corpus)})
    copy_run(partial, spec.directory)
    write_study(study, {"command": None, "runs": [spec.record()]})
    assert json.loads((study / "study.json").read_text())["runs"][0]["directory"] == "base/mha-s0"
    moved = tmp_path / "moved"
    shutil.copytree(study, moved)
    shutil.rmtree(study)  # the original is gone: a report of the copy can only read the copy
    data = load(moved)
    assert list(data.runs["directory"]) == [str(moved / "base" / "mha-s0")]
    assert set(data.attention["step"]) == {0, 2}
    old = tmp_path / "old"  # a plan written by an earlier version: absolute directories, read as they are
    old.mkdir()
    record = {**spec.record(), "directory": str(moved / "base" / "mha-s0")}
    (old / "study.json").write_text(json.dumps({"command": None, "runs": [record]}))
    assert read_study(old)["runs"][0]["directory"] == str(moved / "base" / "mha-s0")
    assert set(load(old).attention["step"]) == {0, 2}


# ---- one line and exit 2 ------------------------------------------------------------------------------------

class _Payload:
    """Pickles as a call of ``os.system``: what a malicious state.pt holds."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_malicious_state_file_is_refused_in_one_line_and_its_code_does_not_run(partial, corpus, tmp_path):
    run = copy_run(partial, tmp_path / "r")
    marker = tmp_path / "it-ran"
    torch.save({"step": 2, "optimizer": _Payload(f"touch {marker}"), "torch_rng": torch.get_rng_state()},
               RunDir(run).state(2))
    line = one_error(runner.invoke(app, ["train", *tiny_args(corpus), "--run", str(run), "--resume"]))
    assert "step_000002.state.pt" in line and "refused" in line and "GLOBAL" in line and "system" in line
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused"):
        train(tiny(corpus), run, resume=True, progress=False)
    assert not marker.exists()


def test_a_broken_run_config_or_study_plan_given_to_report_is_one_line(partial, tmp_path):
    run = copy_run(partial, tmp_path / "r")
    text = (run / "config.json").read_text()
    for broken, message in ((text[: len(text) // 2], "not a readable run config"),
                            ('{"model": {}, "train": {}}', "not a rankscope run config"),
                            ('{"model": 1, "train": 2}', "not a rankscope run config")):
        (run / "config.json").write_text(broken)
        line = one_error(runner.invoke(app, ["report", str(run)]))
        assert "config.json" in line and message in line
    study = tmp_path / "s"
    study.mkdir()
    record = {"name": "mha-s0", "directory": "mha-s0", "variant": "mha", "seed": 0, "sweep": "base", "config": None}
    for broken in (json.dumps({"runs": [record]})[:30], '{"runs": 5}', '[]', json.dumps({"runs": [{"name": "x"}]}),
                   json.dumps({"runs": [{**record, "config": {"train": {}}}]})):
        (study / "study.json").write_text(broken)
        line = one_error(runner.invoke(app, ["report", str(study)]))
        assert str(study) in line and ("plan" in line or "train.steps" in line), line


READ_ONLY = """
import json, os, sys
from pathlib import Path
from typer.testing import CliRunner
import rankscope.cli
from rankscope.data import prepare

rankscope.cli.console.width = 200
case = json.loads(sys.argv[1])
runner = CliRunner()
out = {}
result = runner.invoke(rankscope.cli.app, case["resume_read_only_run"])
out["run"] = [result.exit_code, result.output]
os.environ["RANKSCOPE_DATA_DIR"] = case["read_only_cache"]
result = runner.invoke(rankscope.cli.app, case["train_new_run"])
out["cache"] = [result.exit_code, result.output]
data = prepare(case["corpus"], 300, None, cache=Path(case["complete_read_only_cache"]))  # only reads: works
out["complete"] = int(data.train.size)
print(json.dumps(out))
"""


def test_read_only_run_and_data_cache_directories_are_one_line(partial, corpus):
    base = Path(tempfile.mkdtemp(prefix="rankscope-ro-"))
    try:
        run = copy_run(partial, base / "run")
        empty = base / "empty-cache"
        empty.mkdir()
        complete = base / "complete-cache"
        prepare(str(corpus), 300, None, cache=complete)
        for path in (*run.rglob("*"), run, empty, *complete.rglob("*"), complete):
            if path.is_dir():
                path.chmod(0o555)
        case = {"resume_read_only_run": ["train", *tiny_args(corpus), "--run", str(run), "--resume"],
                "read_only_cache": str(empty),
                "train_new_run": ["train", *tiny_args(corpus), "--run", str(base / "new")],
                "complete_read_only_cache": str(complete), "corpus": str(corpus)}
        base.chmod(0o777)  # the new run's directory can be made; the caches and the old run cannot be written
        done = subprocess.run([sys.executable, "-c", READ_ONLY, json.dumps(case)], capture_output=True, text=True,
                              timeout=120, preexec_fn=as_a_plain_user())
        assert done.returncode == 0, done.stderr[-3000:]
        out = json.loads(done.stdout.splitlines()[-1])
        for key, where in (("run", str(run)), ("cache", str(empty))):
            code, output = out[key]
            assert code == 2 and len(error_lines(output)) == 1, output
            assert where in error_lines(output)[0] and "writ" in error_lines(output)[0], output
        assert out["complete"] > 0
    finally:
        for path in (base, *base.rglob("*")):
            if path.is_dir():
                path.chmod(0o755)
        shutil.rmtree(base)


# ---- the data cache heals -------------------------------------------------------------------------------------

def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:  # one byte of the payload changed, the size kept
        i = len(data) - 3
        path.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:])


CACHE_CASES = [("meta.json", "truncated"), ("tokenizer.json", "truncated"), ("train.npy", "truncated"),
               ("val.npy", "truncated"), ("train.npy", "flipped")]


@pytest.mark.parametrize(("name", "how"), CACHE_CASES, ids=[f"{n}-{h}" for n, h in CACHE_CASES])
def test_a_damaged_cache_file_is_rebuilt_with_a_warning(corpus, tmp_path, name, how):
    cache = tmp_path / "cache"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fresh build is no damage: no warning
        good = prepare(str(corpus), 300, None, cache=cache)
    folder = good.tokenizer_path.parent
    train_tokens, val_tokens = np.array(good.train), np.array(good.val)
    sample = good.tokenizer().encode("def f_7(x, y):\n    return x * 7\n").ids
    del good  # its memory maps are not read again once the file is damaged
    _damage(folder / name, how)
    with pytest.warns(UserWarning, match=f"{name}.*rebuilding"):
        healed = prepare(str(corpus), 300, None, cache=cache)
    np.testing.assert_array_equal(healed.train, train_tokens)
    np.testing.assert_array_equal(healed.val, val_tokens)
    assert healed.tokenizer().encode("def f_7(x, y):\n    return x * 7\n").ids == sample
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["files"]["train.npy"]["bytes"] == (folder / "train.npy").stat().st_size
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # healed: the next read verifies, warns of nothing and rewrites nothing
        prepare(str(corpus), 300, None, cache=cache)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps


def test_a_cache_of_an_earlier_version_is_verified_by_loading_and_gains_digests(corpus, tmp_path):
    cache = tmp_path / "cache"
    folder = prepare(str(corpus), 300, None, cache=cache).tokenizer_path.parent
    meta = json.loads((folder / "meta.json").read_text())
    tokenizer_stamp = (folder / "tokenizer.json").stat().st_mtime_ns
    (folder / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "files"}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare(str(corpus), 300, None, cache=cache)
    assert json.loads((folder / "meta.json").read_text())["files"] == meta["files"]
    assert (folder / "tokenizer.json").stat().st_mtime_ns == tokenizer_stamp  # nothing retrained
    _damage(folder / "val.npy", "truncated")  # an old cache without digests: a file that does not load is rebuilt
    (folder / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "files"}))
    with pytest.warns(UserWarning, match="val.npy.*does not load"):
        prepare(str(corpus), 300, None, cache=cache)


def test_a_file_system_without_flock_trains_unlocked_with_a_warning_not_a_false_holder(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")  # e.g. an NFS mount without a lock daemon

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match="cannot lock the run"):
        with RunDir(tmp_path / "r").lock():
            assert "pid" in (tmp_path / "r" / "train.lock").read_text()

    def held(fd, op):
        raise BlockingIOError(errno.EWOULDBLOCK, "Resource temporarily unavailable")  # another holder

    monkeypatch.setattr(fcntl, "flock", held)
    (tmp_path / "r" / "train.lock").write_text("pid 4242 on elsewhere, since then\n")
    with pytest.raises(InputError, match="another trainer holds this run \\(pid 4242 on elsewhere"):
        with RunDir(tmp_path / "r").lock():
            pass
