"""``analyze``'s contract with its user: options validated before any work, no silent empties (an unknown
architecture says so; attention kinds asked of it are an error), mixture-of-experts matrices one row per expert,
the eigenvalues on request, and the rows file readable by pandas. The CLI side is in ``test_cli_analyze``."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from rankscope.analysis import _sampled, analyze, analyze_full, parse_experts
from rankscope.errors import CheckpointError, InputError

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.ReLU(), torch.nn.Linear(30, 10))


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(null="bogus"), r"null must be one of product, mp, tw, permutation; got 'bogus'"),
    (dict(fpr=0.0), r"fpr must be a number in \(0, 0\.5\]"),
    (dict(fpr=0.7), r"fpr must be a number in \(0, 0\.5\]"),
    (dict(fpr=float("nan")), r"fpr must be a number in \(0, 0\.5\]"),
    (dict(fpr="0.1"), r"fpr must be a number in \(0, 0\.5\]"),
    (dict(kinds=["qk", "nope"]), r"unknown kinds \['nope'\]"),
    (dict(null="tw"), r'null "tw" \(the Tracy–Widom edge\) is defined for a single matrix'),
    (dict(experts="sample:0"), r"experts must be all, none or sample:K"),
    (dict(experts="some"), r"experts must be all, none or sample:K"),
])
def test_bad_options_are_refused_before_any_work(monkeypatch, kwargs, message):
    import rankscope.analysis as analysis

    def must_not_run(*args, **kw):
        raise AssertionError("the model was read before the options were checked")

    monkeypatch.setattr(analysis, "_source", must_not_run)
    with pytest.raises(InputError, match=message):
        analyze_full(_mlp(), **kwargs)


def test_tw_is_accepted_for_single_matrices():
    df = analyze(_mlp(), null="tw", kinds=["weights"])
    assert len(df) == 2 and (df["error"] == "").all() and (df["null"] == "tw").all()


def test_an_unknown_architecture_says_so_once_and_refuses_attention_kinds():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = analyze(_mlp())
    notes = [str(w.message) for w in caught]
    assert len(notes) == 1 and "no config.json (model_type unknown)" in notes[0]
    assert "per-head attention forms need a layout" in notes[0] and "llama" in notes[0]
    assert list(df["name"]) == ["0.weight", "2.weight"]
    with pytest.raises(InputError, match=r"Sequential: cannot read kinds qk, qk_content, qk_rope: .*need a layout"):
        analyze(_mlp(), kinds=["qk"])


def test_nothing_to_diagnose_is_an_error_not_an_empty_table():
    conv = torch.nn.Conv2d(3, 4, 3)  # a 4-D weight and a bias: no 2-D matrix
    with pytest.raises(InputError, match=r"Conv2d: nothing to diagnose"):
        analyze(conv)


def test_spectra_are_the_squared_singular_values():
    model = _mlp()
    df = analyze(model, spectra=True)
    for name, w in (("0.weight", model[0].weight), ("2.weight", model[2].weight)):
        eig = np.asarray(df.loc[df["name"].eq(name), "eigenvalues"].iloc[0])
        s2 = torch.linalg.svdvals(w.detach().double()).pow(2).numpy()  # dense SVD, independent of the kernels
        np.testing.assert_allclose(eig / eig[0], s2 / s2[0], rtol=1e-9, atol=1e-12)


# ---- mixtures of experts --------------------------------------------------------------------------------------


def _mixtral(n_experts: int = 4):
    import transformers

    cfg = transformers.MixtralConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=8, num_local_experts=n_experts,
                                     num_experts_per_tok=2)
    torch.manual_seed(0)
    return transformers.MixtralModel(cfg).eval()


def test_stacked_experts_give_one_row_per_expert_matrix_and_the_router():
    model = _mixtral(4)
    df = analyze(model, kinds=["mlp"])
    state = model.state_dict()
    experts = df[df["expert"] >= 0]
    for layer in (0, 1):
        for tensor in ("gate_up_proj", "down_proj"):
            name = f"layers.{layer}.mlp.experts.{tensor}"
            rows = experts[experts["name"].str.startswith(name + "[")]
            assert sorted(rows["expert"]) == [0, 1, 2, 3] and (rows["layer"] == layer).all()
            for r in rows.itertuples():  # each row is that expert's own [out, in] slice (dense SVD check)
                w = state[name][r.expert].double()
                assert r.shapes == "·".join(map(str, w.shape))
                s2 = torch.linalg.svdvals(w).pow(2)
                assert r.stable_rank == pytest.approx((s2.sum() / s2.max()).item(), rel=1e-9)
    router = df[df["kind"].eq("router")]
    assert sorted(router["name"]) == ["layers.0.mlp.gate.weight", "layers.1.mlp.gate.weight"]
    assert set(df["kind"]) <= {"mlp_in", "mlp_out", "router"}


def test_sampled_experts_are_the_same_in_every_tensor_of_a_layer_and_reproducible():
    df = analyze(_mixtral(6), kinds=["mlp"], experts="sample:2")
    experts = df[df["expert"] >= 0]
    for layer, g in experts.groupby("layer"):
        picked = {tensor: sorted(h["expert"]) for tensor, h in g.groupby(g["name"].str.split("[").str[0])}
        assert len(picked) == 2 and all(len(v) == 2 for v in picked.values())
        assert len({tuple(v) for v in picked.values()}) == 1  # gate_up and down: the same two experts
        assert picked[f"layers.{layer}.mlp.experts.down_proj"] == _sampled(6, 2, layer)
    assert len(analyze(_mixtral(6), kinds=["mlp"], experts="none").query("expert >= 0")) == 0
    assert parse_experts("sample:3") == 3 and parse_experts("all") is None and parse_experts("none") == 0


def test_experts_stored_as_modules_get_their_expert_index():
    torch.manual_seed(1)
    state = {f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight": torch.randn(12, 8) if w != "w2" else
             torch.randn(8, 12) for e in range(3) for w in ("w1", "w2", "w3")}
    state["model.layers.0.block_sparse_moe.gate.weight"] = torch.randn(3, 8)

    class Holder(torch.nn.Module):
        def state_dict(self, *a, **k):
            return state

    df = analyze(Holder(), kinds=["mlp"])
    assert sorted(df.loc[df["kind"].eq("mlp_in"), "expert"]) == [0, 0, 1, 1, 2, 2]
    assert sorted(df.loc[df["kind"].eq("mlp_out"), "expert"]) == [0, 1, 2]
    assert df.loc[df["kind"].eq("router"), "expert"].tolist() == [-1]
    one = analyze(Holder(), kinds=["mlp"], experts="sample:1")
    assert one.loc[one["expert"] >= 0, "expert"].nunique() == 1 and len(one) == 3 + 1


def test_the_monitor_records_gemma_attention_and_warns_once_where_there_is_no_layout(tmp_path):
    import transformers

    import rankscope as rs

    cfg = transformers.GemmaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=4, intermediate_size=16)
    torch.manual_seed(0)
    monitor = rs.Monitor(transformers.GemmaModel(cfg), tmp_path / "gemma", every=1, tensorboard=False)
    monitor.step(0)
    monitor.flush()
    qk = monitor.store.sql("SELECT layer, head_index FROM qk WHERE \"null\" = 'product'")
    assert sorted(set(qk["layer"])) == [0, 1] and len(qk) == 2 * (1 + 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain = rs.Monitor(_mlp(), tmp_path / "mlp", every=1, tensorboard=False)
        plain.step(0)
        plain.step(1)
    assert sum("per-head attention forms need a layout" in str(w.message) for w in caught) == 1


def test_plain_matrices_of_a_model_with_stacks_carry_their_stack():
    import transformers

    cfg = transformers.T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=16, num_layers=2, num_heads=4)
    torch.manual_seed(0)
    df = analyze(transformers.T5ForConditionalGeneration(cfg), kinds=["weights", "mlp"])
    where = dict(zip(df["name"], df["stack"], strict=True))
    assert where["encoder.block.0.layer.0.SelfAttention.q.weight"] == "encoder"
    assert where["decoder.block.1.layer.0.SelfAttention.k.weight"] == "decoder"
    assert where["decoder.block.1.layer.1.EncDecAttention.v.weight"] == "cross"
    assert where["encoder.block.1.layer.1.DenseReluDense.wi.weight"] == "encoder"


def test_bloom_configs_that_spell_the_width_n_embed_are_read():
    import transformers

    from rankscope.probes import hf_forms

    cfg = transformers.BloomConfig(vocab_size=32, hidden_size=16, n_layer=2, n_head=4)
    torch.manual_seed(0)
    state = transformers.BloomModel(cfg).state_dict()
    as_saved = {k: v for k, v in cfg.to_dict().items() if k != "hidden_size"} | {"n_embed": 16}  # the hub's file
    a, b = list(hf_forms(cfg, state)), list(hf_forms(as_saved, state))
    assert [f.key for f in a] == [f.key for f in b] and len(a) == 2 * 2 * (1 + 4)
    for x, y in zip(a, b, strict=True):
        assert all(torch.equal(p, q) for p, q in zip(x.form.factors, y.form.factors, strict=True))


def test_a_layout_that_does_not_fit_the_weights_falls_back_with_a_note_unless_attention_was_asked():
    class Renamed(torch.nn.Module):  # says llama, but its weights are not where a LLaMA keeps them
        def __init__(self):
            super().__init__()
            self.config = {"model_type": "llama", "hidden_size": 20, "num_attention_heads": 2}
            self.inner = _mlp()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = analyze(Renamed())
    assert [str(w.message) for w in caught if "could not be read" in str(w.message)]
    assert sorted(df["name"]) == ["inner.0.weight", "inner.2.weight"]
    with pytest.raises(CheckpointError, match="no parameter matches the llama attention layout"):
        analyze(Renamed(), kinds=["qk"])


def test_a_tensor_of_more_than_two_dimensions_gets_a_row_saying_it_was_skipped():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(16, 5))
    df = analyze(model, kinds=["weights"])
    conv = df[df["name"].eq("0.weight")].iloc[0]
    assert conv["error"] == "skipped: a 4-D tensor, not a matrix" and conv["shapes"] == "4·3·3·3"
    assert df.loc[df["name"].eq("2.weight"), "error"].iloc[0] == ""
