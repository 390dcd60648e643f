"""describe: the forms analyze would diagnose, without a spectrum, checked against the probes and analyze's rows."""

import os

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from rankscope.analysis import analyze_full
from rankscope.analysis.describe import Description, describe, describe_full, work
from rankscope.cli import app
from rankscope.probes import hf_forms
from rankscope.probes.load import Checkpoint

os.environ.setdefault("HF_HUB_OFFLINE", "1")
KEY = ["name", "stack", "layer", "head_index", "expert", "kind", "offset"]


def llama(layers: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=layers,
                      intermediate_size=96, vocab_size=80)
    return LlamaModel(cfg).eval()


def keys(df: pd.DataFrame) -> list[tuple]:
    return sorted(map(tuple, df[KEY].astype(str).values))


def refuse_spectra(monkeypatch) -> None:
    """Every eigensolver, SVD and QR that a spectrum could use raises from here on."""
    import importlib

    def refuse(*args, **kwargs):
        raise AssertionError("describe computed a spectrum")

    kernels = importlib.import_module("rankscope.spectra.kernels")
    diagnose_module = importlib.import_module("rankscope.spectra.diagnose")
    for owner, name in ((torch.linalg, "eigvalsh"), (torch.linalg, "svdvals"), (torch.linalg, "svd"),
                        (torch.linalg, "qr"), (np.linalg, "eigvalsh"), (np.linalg, "svd"), (kernels, "spectrum"),
                        (diagnose_module, "spectrum")):
        monkeypatch.setattr(owner, name, refuse)


@pytest.fixture
def no_eigensolver(monkeypatch):
    refuse_spectra(monkeypatch)


def test_forms_match_the_probe_and_analyze_rows_without_any_spectrum(monkeypatch):
    model = llama()
    expected = analyze_full(model).table  # before the eigensolvers are refused
    probe = {f.key: str(f.form.structure) for f in hf_forms(model.config, model.state_dict())}
    refuse_spectra(monkeypatch)
    found = describe_full(model)
    df = found.table
    assert isinstance(found, Description) and (found.model_type, found.family) == ("llama", "llama")
    assert keys(df) == keys(expected)  # the same rows, one per form (one null here)
    merged = df.merge(expected, on=KEY, suffixes=("", "_analyze"))
    assert (merged["shapes"] == merged["shapes_analyze"]).all() and (merged["rank"] == merged["rank_analyze"]).all()
    forms = df[~df["plain"]]
    assert {(r.layer, r.head_index, r.kind): r.shapes for r in forms.itertuples()} == probe
    heads = forms[forms["head_index"] >= 0]
    assert set(heads["shapes"]) == {"64·16·64"} and (heads["rank"] == 16).all()  # d=64, 4 heads of dh=16
    assert set(forms.loc[forms["head_index"] < 0, "shapes"]) == {"64·32·64"}  # GQA: the layer's rank bound is H_kv·dh
    assert (forms["kv_cache_floats"] == 2 * 2 * 16).all()
    assert found.fallback == [] and found.notes == []


def test_a_checkpoint_on_disk_is_described_from_its_headers(tmp_path, monkeypatch, no_eigensolver):
    model = llama()
    model.save_pretrained(tmp_path)
    in_memory = describe(model)

    def refuse(self, name):
        raise AssertionError(f"describe read {name}")

    monkeypatch.setattr(Checkpoint, "tensor", refuse)
    on_disk = describe(tmp_path)
    assert keys(on_disk) == keys(in_memory)
    assert on_disk.attrs["model_type"] == "llama" and on_disk.attrs["estimate"]["seconds"] > 0


def test_mla_layouts_read_the_values_they_need_and_match_analyze():
    from transformers import DeepseekV2Config, DeepseekV2Model

    torch.manual_seed(0)
    cfg = DeepseekV2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=1,
                           intermediate_size=96, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
                           first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
                           qk_nope_head_dim=16, v_head_dim=16, vocab_size=80)
    model = DeepseekV2Model(cfg).eval()
    found = describe_full(model)
    assert found.family == "mla"
    assert keys(found.table) == keys(analyze_full(model).table)
    probe = {f.key: str(f.form.structure) for f in hf_forms(model.config, model.state_dict())}
    forms = found.table[~found.table["plain"]]
    assert {(r.layer, r.head_index, r.kind): r.shapes for r in forms.itertuples()} == probe


class Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.ModuleList([nn.MultiheadAttention(32, 4) for _ in range(2)])
        self.head = nn.Linear(32, 10)


class Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.mixer = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 8)


def test_multihead_attention_modules_and_unknown_models(no_eigensolver):
    torch.manual_seed(0)
    model = Blocks()
    found = describe_full(model)
    assert found.family == "nn.MultiheadAttention"
    heads = found.table[(found.table["head_index"] >= 0)]
    assert len(heads) == 2 * 2 * 4 and set(heads["shapes"]) == {"32·8·32"}
    unknown = describe_full(Unknown())
    assert (unknown.model_type, unknown.family) == ("unknown", "unknown")
    assert unknown.table["plain"].all() and set(unknown.fallback) == {"q_proj.weight", "k_proj.weight"}
    assert unknown.not_understood == ["mixer.weight"] and len(unknown.notes) == 1


def t5():
    from transformers import T5Config, T5Model

    torch.manual_seed(0)
    return T5Model(T5Config(d_model=32, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2, d_ff=64,
                            vocab_size=50)).eval()


def native():
    from rankscope.nn import GPT
    from rankscope.nn.config import ModelConfig

    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=2, n_head=4, d_model=32, vocab_size=40, max_seq_len=16, attention="gqa",
                           n_kv_head=2))


@pytest.mark.parametrize(("make", "family", "stacks"), [(Blocks, "nn.MultiheadAttention", set()),
                                                         (t5, "t5", {"encoder", "decoder", "cross"}),
                                                         (native, "rankscope", set())])
def test_rows_match_analyze_for_other_kinds_of_model(make, family, stacks):
    model = make()
    offsets = (0, -2) if make is native else (0,)
    found = describe_full(model, offsets=offsets)
    assert found.family == family and set(found.table["stack"]) - {""} == stacks  # named stacks (T5's shared
    # embedding belongs to none)
    assert keys(found.table) == keys(analyze_full(model, offsets=offsets).table)


def test_the_null_estimate_counts_each_structure_once_and_work_follows_the_shapes(no_eigensolver):
    two, four = describe_full(llama(layers=2)).estimate, describe_full(llama(layers=4)).estimate
    # the same shapes in every layer: twice the layers, the same nulls (simulated once per shape, then cached)
    assert four.nulls == two.nulls and four.null_seconds == pytest.approx(two.null_seconds)
    assert four.spectra_seconds > two.spectra_seconds and four.seconds >= four.seconds_min > 0
    assert work(((768, 64, 768),)) == (768 + 768) * 64**2 + 64**3  # the documented QR + core work
    assert work(((1536, 384),)) == 1536 * 384**2 + 384**3  # Gram product + eigensolver


def test_the_cli_prints_the_forms_and_the_estimate(tmp_path, monkeypatch):
    import rankscope.cli

    monkeypatch.setattr(rankscope.cli.console, "width", 200)  # one line a row (no terminal under xdist)
    llama().save_pretrained(tmp_path)
    runner = CliRunner()
    result = runner.invoke(app, ["describe", str(tmp_path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "model_type llama" in result.output and "64·16·64" in result.output and "estimate" in result.output
    bad = runner.invoke(app, ["describe", str(tmp_path / "missing")], env={"COLUMNS": "200"})
    assert bad.exit_code == 2 and "no such file or directory" in bad.output
