"""The first ten minutes: help that is fast and complete, one set of variant names, integer columns, the scale note."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import rankscope
import rankscope.cli
from rankscope.cli import app
from rankscope.nn import GPT, ModelConfig
from rankscope.train.config import PRESETS, TrainConfig
from rankscope.vocab import STUDY_VARIANTS, VARIANTS

COMMANDS = ("analyze", "describe", "diff", "train", "study", "report", "sql", "repr", "demo")


@pytest.fixture
def wide(monkeypatch):
    monkeypatch.setattr(rankscope.cli.console, "width", 200)


def help_of(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], prog_name="rankscope",
                                env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def test_help_needs_no_torch():
    """``--help`` of the app and of every command imports neither torch nor pandas: what makes it fast (the times
    are in benchmarks/cli_help.py)."""
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom rankscope.cli import app\n"
            f"for c in {list(COMMANDS)!r} + [None]:\n"
            "    r = CliRunner().invoke(app, ([c] if c else []) + ['--help'])\n"
            "    assert r.exit_code == 0, (c, r.output)\n"
            "print(sorted(m for m in ('torch', 'pandas', 'numpy', 'duckdb') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("command", COMMANDS)
def test_flags_read_as_flags_and_arguments_in_capitals(command):
    text = help_of(command)
    assert "<bool>" not in text
    usage = next(line for line in text.splitlines() if "Usage:" in line)
    assert usage.strip().startswith(f"Usage: rankscope {command} [OPTIONS]")
    arguments = usage.split("[OPTIONS]")[1].strip()
    assert "{" not in arguments and arguments == arguments.upper()


def test_analyze_help_shows_the_head_flag_pair():
    text = help_of("analyze")
    line = next(t for t in text.splitlines() if "--per-head" in t)
    assert "--per-layer" in line and "<bool>" not in line


@pytest.mark.parametrize("command", ["train", "study"])
def test_help_lists_every_setting_with_its_type_and_each_presets_value(command):
    text = help_of(command)
    lines = {line.split()[0]: line for line in text.splitlines() if line.strip().startswith("--")}
    for cls in (ModelConfig, TrainConfig):
        for f in dataclasses.fields(cls):
            line = lines.get(f"--{f.name}")
            assert line is not None, f"--{f.name} missing from {command} --help"
            values = {p: v.get(f.name, f.default) for p, v in PRESETS.items()}
            if len({repr(v) for v in values.values()}) > 1:  # the presets differ: each is shown
                for p, v in values.items():
                    assert f"{p} {v!r}" in line, (line, p, v)
            else:
                assert f"= {f.default!r}" in line
    assert "--lr float" in lines["--lr"] and "--n_layer int" in lines["--n_layer"]


def test_study_and_train_default_to_the_smoke_preset_and_state_the_cost_of_the_others():
    from typer.main import get_command

    commands = get_command(app).commands
    for name in ("train", "study"):
        preset = next(p for p in commands[name].params if p.name == "preset")
        assert preset.default == "smoke"
        assert "cpu (8 layers, 600 steps" in preset.help and "paper" in preset.help and "GPU" in preset.help


def test_one_set_of_variant_names_from_train_to_the_store():
    """``train --attention`` takes the study's names; the model's forms (and so the store's ``variant`` column)
    carry the same name, so ``mla_prerope`` is never split by a separate ``--rope_mode`` in one place only."""
    from rankscope.train.config import resolve

    assert set(STUDY_VARIANTS) <= set(VARIANTS) and "mqa" in VARIANTS
    for name, fields in VARIANTS.items():
        cfg = resolve("smoke", dict(fields))
        small = dataclasses.replace(cfg.model, n_layer=1, vocab_size=32, d_model=32, n_head=2, head_dim=None,
                                    n_kv_head=None, d_ff=None, kv_lora_rank=8, qk_rope_dim=4)
        forms = GPT(small).blocks[0].attn.qk_chains(heads=True)
        assert {f.variant for f in forms} == {name}, name


def test_train_help_lists_the_one_set_of_names():
    text = help_of("train")
    line = " ".join(t for t in text.splitlines() if "the variant:" in t or "mla_prerope_" in t)
    for name in VARIANTS:
        assert name in line


def test_integer_columns_are_integers_even_beside_an_error_row(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file({"a.weight": torch.randn(64, 32), "b.weight": torch.full((8, 8), float("nan"))},
              str(tmp_path / "m.safetensors"))
    with pytest.warns(UserWarning):
        df = rankscope.analyze(tmp_path / "m.safetensors")
    assert (df["error"] != "").sum() == 1  # the NaN matrix is an error row with no diagnosis
    for col in ("layer", "head_index", "offset", "n", "m", "rank", "outliers"):
        assert pd.api.types.is_integer_dtype(df[col]), (col, df[col].dtype)
    ok = df[df["error"] == ""].iloc[0]
    assert (ok["n"], ok["m"], ok["rank"]) == (64, 32, 32)
    assert "head" not in df.columns and callable(df.head)


def test_dir_lists_the_public_api():
    for name in ("analyze", "Monitor", "capture", "diagnose", "RunStore", "summary", "describe", "diff"):
        assert name in dir(rankscope)
        assert getattr(rankscope, name) is not None


def runs_frame(n_layer: int, steps: int, seeds: int) -> pd.DataFrame:
    config = {"model": {"n_layer": n_layer}, "train": {"steps": steps}}
    return pd.DataFrame([{"sweep": "base", "variant": v, "seed": s, "config": config}
                         for v in ("mha", "mla_decoupled") for s in range(seeds)])


def test_the_scale_check_names_each_shortfall_and_is_quiet_at_the_cpu_scale():
    from rankscope.report.verdict import MIN_SCALE, MIN_SEEDS_TO_CONCLUDE, scale_check

    cpu = PRESETS["cpu"]
    assert (cpu["n_layer"], cpu["steps"]) == (MIN_SCALE["n_layer"], MIN_SCALE["steps"])  # the floor is cpu's
    assert scale_check(runs_frame(cpu["n_layer"], cpu["steps"], MIN_SEEDS_TO_CONCLUDE))["too_small"] == []
    smoke = PRESETS["smoke"]
    check = scale_check(runs_frame(smoke["n_layer"], smoke["steps"], 3))
    assert check["too_small"] == ["2 layers < 8", "100 steps < 600", "3 seeds < 5"]
    assert scale_check(runs_frame(8, 599, 5))["too_small"] == ["599 steps < 600"]


def test_the_printed_verdict_says_when_the_study_is_too_small(tmp_path, wide):
    from rankscope.commands.study import print_verdict

    claims = {k: {"verdict": "inconclusive"} for k in ("i", "ii", "iii")}
    points = [{"sweep": "base", "claims": claims, "scale": {"too_small": ["2 layers < 8"]}},
              {"sweep": "lr=1", "claims": claims, "scale": {"too_small": []}}]
    (tmp_path / "summary.json").write_text(json.dumps({"points": points}))
    with rankscope.cli.console.capture() as cap:
        print_verdict(rankscope.cli.console, tmp_path)
    text = cap.get()
    assert "no: too small (2 layers < 8)" in text and "yes" in text and "not as findings" in text


def test_the_study_banner_states_scale_and_run_count():
    from rankscope.commands.settings import study_banner

    smoke = study_banner("smoke", 3, ",".join(STUDY_VARIANTS), None)
    assert "6 variants × 3 seeds = 18 training runs of 2 layers" in smoke and "plumbing check" in smoke
    cpu = study_banner("cpu", 5, ",".join(STUDY_VARIANTS), "lr=1e-3,2e-3")
    assert "× 2 sweep points = 60 training runs of 8 layers" in cpu and "plumbing" not in cpu


def test_a_setting_that_contradicts_the_named_variant_is_refused_before_work(tmp_path):
    result = CliRunner().invoke(app, ["train", "--attention", "mla_prerope_coupled", "--rope_mode", "input",
                                      "--run", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "--attention mla_prerope_coupled sets rope_mode=coupled; --rope_mode input contradicts it" in " ".join(
        result.output.split())
    assert not (tmp_path / "r").exists()  # refused before any work
