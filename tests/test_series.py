"""Checkpoint series: steps from names, trainer_state.json or the order given; a run store whose rows per step
are ``analyze_full`` of that checkpoint (computed again, independently); ``--jobs 2`` = ``--jobs 1``; and the
report's layer × step heatmaps, one row per attention stack."""

from __future__ import annotations

import io
import json
import struct

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from rankscope.analysis import analyze_full
from rankscope.cli import app
from rankscope.commands.series import analyze_series, checkpoint_series, step_of_name
from rankscope.errors import InputError
from rankscope.store import RunStore

STEPS = (10, 20, 30)
KEYS = ["step", "name", "stack", "layer", "head_index", "kind", "offset", "null"]
VALUES = ["outliers", "spikes", "lambda_max", "bulk_edge", "stable_rank", "effective_rank", "erank_vs_null"]
OPTIONS = dict(per_head=True, kinds=None, null="product", fpr=0.01)


def tiny(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, vocab_size=64,
                                        max_position_embeddings=32))


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


@pytest.fixture(scope="module")
def trainer_dir(tmp_path_factory):
    """An HF Trainer output dir: checkpoint-{10,20,30}/ with model.safetensors, config.json, trainer_state.json; the
    weights drift by noise from one checkpoint to the next."""
    root = tmp_path_factory.mktemp("trainer")
    model = tiny()
    for step in STEPS:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.add_(0.01 * torch.randn_like(p))
        model.save_pretrained(root / f"checkpoint-{step}")
        (root / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return root


@pytest.fixture(scope="module")
def series_store(trainer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("series") / "s1"
    from rankscope.spectra import thread_budget

    with thread_budget(torch=1, blas=1):
        analyze_series(quiet(), checkpoint_series([str(trainer_dir)]), out=out, jobs=1, **OPTIONS)
    return out


def _weights_file(path):
    from safetensors.torch import save_file

    save_file({"w": torch.randn(8, 8)}, str(path))
    return path


# ---------------------------------------------------------------------------------------------- recognising a series


def test_steps_come_from_the_name():
    for name, step in (("checkpoint-500", 500), ("step_000100.safetensors", 100), ("step-7", 7), ("ckpt-3.pt", 3),
                       ("iter_0000200", 200), ("500", 500), ("ckpt_12.bin", 12)):
        assert step_of_name(name) == step, name
    for name in ("step_000100.state.pt", "final", "model_v2", "ckpt-3.txt", "checkpoint-", "checkpoints"):
        assert step_of_name(name) is None, name


def test_a_directory_of_checkpoints_is_a_series_sorted_by_step(tmp_path, trainer_dir):
    assert checkpoint_series([str(trainer_dir)]) == [(s, str(trainer_dir / f"checkpoint-{s}")) for s in STEPS]
    # weights files named by step, beside files that are not checkpoints (a state file, a log)
    files = tmp_path / "files"
    files.mkdir()
    for step in (100, 20):
        _weights_file(files / f"step_{step:06d}.safetensors")
        (files / f"step_{step:06d}.state.pt").write_bytes(b"")
    (files / "train.log").write_text("")
    assert checkpoint_series([str(files)]) == [(20, str(files / "step_000020.safetensors")),
                                               (100, str(files / "step_000100.safetensors"))]
    # an ordinary checkpoint is not a series
    assert checkpoint_series([str(trainer_dir / "checkpoint-10")]) is None
    assert checkpoint_series([str(files / "step_000020.safetensors")]) is None


def test_steps_from_trainer_state_then_from_the_order_given(tmp_path):
    for name, step in (("best", 15), ("last", 5)):
        (tmp_path / name).mkdir()
        _weights_file(tmp_path / name / "model.safetensors")
        (tmp_path / name / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    paths = [str(tmp_path / "best"), str(tmp_path / "last")]
    assert checkpoint_series(paths) == [(5, paths[1]), (15, paths[0])]
    (tmp_path / "plain").mkdir()
    _weights_file(tmp_path / "plain" / "model.safetensors")
    with pytest.warns(UserWarning, match="position in the order given"):
        assert checkpoint_series([paths[0], str(tmp_path / "plain")]) == [(0, paths[0]), (1, str(tmp_path / "plain"))]


def test_duplicate_steps_and_non_checkpoints_are_input_errors(tmp_path, trainer_dir):
    one = str(trainer_dir / "checkpoint-10")
    (tmp_path / "again").mkdir()
    _weights_file(tmp_path / "again" / "model.safetensors")
    (tmp_path / "again" / "trainer_state.json").write_text(json.dumps({"global_step": 10}))
    with pytest.raises(InputError, match="step 10 again"):
        checkpoint_series([one, str(tmp_path / "again")])
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match=r"notes\.txt: not a checkpoint"):
        checkpoint_series([one, str(tmp_path / "notes.txt")])
    with pytest.raises(InputError, match="missing: no such file"):
        checkpoint_series([one, str(tmp_path / "missing")])
    (tmp_path / "bad").mkdir()
    _weights_file(tmp_path / "bad" / "model.safetensors")
    (tmp_path / "bad" / "trainer_state.json").write_text(json.dumps({"global_step": "ten"}))
    with pytest.raises(InputError, match="global_step must be a non-negative integer"):
        checkpoint_series([one, str(tmp_path / "bad")])


def test_a_rankscope_run_with_several_checkpoints_is_a_series(tmp_path):
    from rankscope.nn import GPT, ModelConfig
    from rankscope.rundir import RunDir

    model = GPT(ModelConfig(vocab_size=32, n_layer=1, d_model=16, n_head=2, max_seq_len=8))
    run = RunDir(tmp_path / "run")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    run.save_checkpoint(2, model, optimizer, keep=5)
    assert checkpoint_series([str(run.path)]) is None  # one checkpoint: analysed as one, as before
    run.save_checkpoint(4, model, optimizer, keep=5)
    expected = [(2, str(run.weights(2))), (4, str(run.weights(4)))]
    assert checkpoint_series([str(run.path)]) == expected
    assert checkpoint_series([str(run.checkpoints)]) == expected


# ---------------------------------------------------------------------------------------------- the store


def test_each_step_holds_the_analysis_of_its_checkpoint(series_store, trainer_dir, one_thread):
    store = RunStore(series_store)
    for table in ("attention", "weights", "spectra"):
        steps = store.sql(f"select distinct step from {table} order by step")["step"].tolist()
        assert steps == list(STEPS), table
    stored = store.sql("select * from attention union all by name select * from weights")
    for step in (10, 30):
        fresh = analyze_full(str(trainer_dir / f"checkpoint-{step}"), **OPTIONS).table.assign(step=step)
        mine = stored[stored["step"] == step]
        assert len(mine) == len(fresh)
        both = mine.merge(fresh, on=KEYS, suffixes=("", "_fresh"), validate="one_to_one")
        assert len(both) == len(fresh)
        for col in VALUES:
            torch.testing.assert_close(torch.tensor(both[col].to_numpy(float)),
                                       torch.tensor(both[col + "_fresh"].to_numpy(float)), rtol=1e-9, atol=0,
                                       equal_nan=True, msg=col)
        assert (mine["checkpoint"] == str(trainer_dir / f"checkpoint-{step}")).all()
    # the spectra table holds each attention form's eigenvalues: their sum is ‖B‖_F², from the checkpoint itself
    from safetensors.torch import load_file

    weights = load_file(str(trainer_dir / "checkpoint-20" / "model.safetensors"))
    q = weights["model.layers.1.self_attn.q_proj.weight"][16:32].double()  # head 1 of layer 1
    k = weights["model.layers.1.self_attn.k_proj.weight"][16:32].double()
    row = store.sql("select eigenvalues from spectra where step = 20 and layer = 1 and head_index = 1 and kind = 'qk'")
    assert sum(row["eigenvalues"].iloc[0]) == pytest.approx(float((q.T @ k).square().sum()), rel=1e-9)
    result = CliRunner().invoke(app, ["sql", str(series_store), "select step, max(outliers) as o from qk group by step "
                                                                "order by step", "--format", "csv"])
    assert result.exit_code == 0 and result.output.splitlines()[0] == "step,o", result.output


def test_two_jobs_give_the_rows_of_one_and_a_rerun_skips_stored_steps(series_store, trainer_dir, tmp_path):
    series = checkpoint_series([str(trainer_dir)])
    out = tmp_path / "s2"
    analyze_series(quiet(), series, out=out, jobs=2, **OPTIONS)
    query = 'select * exclude (run) from {} order by step, name, "null"'
    for table in ("attention", "weights"):
        one, two = (RunStore(d).sql(query.format(table)) for d in (series_store, out))
        assert list(one.columns) == list(two.columns) and len(one) == len(two)
        for col in one.columns:
            if one[col].dtype.kind == "f":
                torch.testing.assert_close(torch.tensor(two[col].to_numpy()), torch.tensor(one[col].to_numpy()),
                                           rtol=1e-9, atol=1e-12, equal_nan=True, msg=col)
            else:
                assert (one[col].fillna(-1).astype(str) == two[col].fillna(-1).astype(str)).all(), col
    parts = sorted((out / "metrics").iterdir())
    console = quiet()
    analyze_series(console, series, out=out, jobs=2, **OPTIONS)
    assert sorted((out / "metrics").iterdir()) == parts and "3 of 3 steps already stored" in console.file.getvalue()


# ---------------------------------------------------------------------------------------------- the report


def _png_height(path) -> int:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">I", data[20:24])[0]


def test_the_report_draws_layer_by_step_heatmaps_per_stack(series_store, tmp_path):
    from rankscope.report.data import load
    from rankscope.report.html import write_report

    page = write_report(series_store).read_text()
    one = series_store / "figures" / "base" / "layer_heatmaps.png"
    assert one.exists() and "layer × step of the per-head query–key forms" in page
    # a model with two attention stacks: one heatmap row per stack, each with only its own rows
    store = RunStore(tmp_path / "two")
    source = RunStore(series_store)
    for stack, extra in (("encoder", 0), ("decoder", 1)):
        attention = source.sql("select * exclude (run) from attention").assign(stack=stack)
        attention["spikes"] = attention["spikes"] + extra
        store.append("attention", attention)
        store.append("spectra", source.sql("select * exclude (run) from spectra").assign(stack=stack))
    store.flush()
    data = load(tmp_path / "two")
    assert sorted(data.runs["name"]) == ["two/decoder", "two/encoder"]
    assert sorted(data.runs["variant"]) == ["mha (decoder)", "mha (encoder)"]
    a = data.attention
    n = len(source.sql("select * from attention"))
    assert (a["name"] == "two/encoder").sum() == n and (a["name"] == "two/decoder").sum() == n
    enc = a[a["name"] == "two/encoder"].sort_values([*KEYS[1:], "step"], key=lambda c: c.astype(str))
    dec = a[a["name"] == "two/decoder"].sort_values([*KEYS[1:], "step"], key=lambda c: c.astype(str))
    torch.testing.assert_close(torch.tensor(dec["spikes"].to_numpy(float)),
                               torch.tensor(enc["spikes"].to_numpy(float) + 1), equal_nan=True)
    from rankscope.report.html import UNKNOWN_CONTEXT, _cells
    from rankscope.report.study_figures import layer_heatmaps
    from rankscope.report.verdict import layer_series

    series = layer_series(_cells(data), data.runs.assign(context=UNKNOWN_CONTEXT))  # what write_report draws
    two = layer_heatmaps(series, "base", tmp_path / "figures", int(data.runs["steps"].max()))
    assert _png_height(two) > 1.3 * _png_height(one)  # two rows of panels
    spectra = data.spectra("two/decoder", "base", "layer = 1 and head_index = 0 and kind = 'qk'")
    assert (spectra["stack"] == "decoder").all() and sorted(spectra["step"]) == list(STEPS)
