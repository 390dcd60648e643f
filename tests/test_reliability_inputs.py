"""Nothing bad is accepted silently: extreme magnitudes give the right spectra (or a named error, never zeros), every
option is checked before any work, and every bad checkpoint or output directory is one line and exit 2 at the CLI
(an ``InputError`` / ``CheckpointError`` naming the file or matrix in the Python API)."""

from __future__ import annotations

import errno
import json
import math
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from typer.testing import CliRunner

import rankscope as rs
from privileges import as_a_plain_user
from rankscope.cli import app
from rankscope.errors import CheckpointError, InputError
from rankscope.probes import load
from rankscope.spectra import budget, kernels

runner = CliRunner()
SHAPES = [(12, 8), (30, 30), (7, 19)]  # a few shapes: their nulls are simulated once, then cached
SCALE_FREE = ("stable_rank", "effective_rank", "participation_ratio", "spectral_entropy", "top_energy", "ks",
              "spike_strength", "mp_soft_rank", "outlier_energy", "excess_kurtosis")


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """The CLI's console is made at import; under xdist it has no terminal: one line a row, as on a wide one."""
    import rankscope.cli

    monkeypatch.setattr(rankscope.cli.console, "width", 200)


def gaussian(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def dense_eigenvalues(B: torch.Tensor, r: int) -> np.ndarray:
    """The independent computation: LAPACK's dense SVD of the multiplied-out form, σ² descending."""
    return np.linalg.svd(B.numpy(), compute_uv=False)[:r] ** 2


def assert_eigenvalues(found: torch.Tensor, scale2: float, ref: np.ndarray) -> None:
    """found ≈ scale2 · ref. The Gram eigensolver's error is ≈ k·eps·λ_max absolute (k ≤ 30: ~1e-14 λ_max), so
    eigenvalues above 1e-3 λ_max agree to 1e-10 relative, and every one to 1e-12 λ_max."""
    expected = scale2 * ref
    got = found.numpy()
    assert got.shape == expected.shape
    top = expected[0]
    big = expected >= 1e-3 * top
    np.testing.assert_allclose(got[big], expected[big], rtol=1e-10)
    assert np.all(np.abs(got - expected) <= 1e-12 * top)


def assert_same_scale_free(d: rs.Diagnosis, d1: rs.Diagnosis, scale2: float) -> None:
    """Counts equal, ratios equal to float precision, and the fields in eigenvalue units scaled by scale2."""
    assert (d.outliers, d.rank) == (d1.outliers, d1.rank)
    assert d.spikes == d1.spikes or (math.isnan(d.spikes) and math.isnan(d1.spikes))
    assert d.bulk_fits == d1.bulk_fits
    for name in SCALE_FREE:
        a, b = getattr(d, name), getattr(d1, name)
        assert a == pytest.approx(b, rel=1e-9, nan_ok=True), name
    for name in ("bulk_edge", "scale", "lambda_max"):
        assert getattr(d, name) == pytest.approx(scale2 * getattr(d1, name), rel=1e-9), name


# ---------------------------------------------------------------------------------------------- magnitudes


@settings(max_examples=25, deadline=None)
@given(shape=st.sampled_from(SHAPES), seed=st.integers(0, 2**16), log_c=st.floats(-150, 150))
def test_a_matrix_times_c_has_c_squared_times_its_eigenvalues(shape, seed, log_c):
    W = gaussian(*shape, seed=seed)
    c = 10.0**log_c
    d, d1 = rs.diagnose(c * W, name="W"), rs.diagnose(W, name="W")
    assert_eigenvalues(d.eigenvalues, c * c, dense_eigenvalues(W, min(shape)))
    assert_same_scale_free(d, d1, c * c)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), log_a=st.floats(-150, 150), log_ac=st.floats(-140, 140))
def test_a_chain_with_extreme_factor_scales_has_the_product_of_their_squares_times_its_eigenvalues(seed, log_a, log_ac):
    log_c = log_ac - log_a  # c from 1e-290 to 1e290, and λ ∝ (ac)² inside float64 (beyond it: the error below)
    A, C = gaussian(24, 6, seed=seed), gaussian(6, 20, seed=seed + 1)
    a, c = 10.0**log_a, 10.0**log_c
    d, d1 = rs.diagnose([a * A, c * C], name="head"), rs.diagnose([A, C], name="head")
    assert_eigenvalues(d.eigenvalues, (a * c) ** 2, dense_eigenvalues(A @ C, 6))
    assert_same_scale_free(d, d1, (a * c) ** 2)


@pytest.mark.parametrize("log_a", [-120.0, 75.0])
def test_a_sum_of_chains_scaled_as_a_whole_keeps_its_blocks_balance(log_a):
    A, C, A2, C2 = gaussian(30, 6, seed=1), gaussian(6, 25, seed=2), gaussian(30, 3, seed=3), gaussian(3, 25, seed=4)
    a = 10.0**log_a
    d = rs.diagnose([[a * A, C], [A2, a * C2]], name="decoupled head")  # both blocks ×a, placed in different factors
    d1 = rs.diagnose([[A, C], [A2, C2]], name="decoupled head")
    assert_eigenvalues(d.eigenvalues, a * a, dense_eigenvalues(A @ C + A2 @ C2, 9))
    assert_same_scale_free(d, d1, a * a)


def test_heads_of_one_batch_at_different_extreme_scales_each_get_their_own():
    H, K = gaussian(3, 40, 8, seed=5), gaussian(3, 8, 30, seed=6)
    scales = [1e70, 1.0, 1e-70]
    s = torch.tensor(scales, dtype=torch.float64)[:, None, None]
    found, unit = rs.diagnose_batch([H * s, K], name="layer 0 qk"), rs.diagnose_batch([H, K])
    for h, (d, d1) in enumerate(zip(found, unit, strict=True)):
        assert_eigenvalues(d.eigenvalues, scales[h] ** 2, dense_eigenvalues(H[h] @ K[h], 8))
        assert_same_scale_free(d, d1, scales[h] ** 2)


def test_one_huge_entry_gives_its_true_eigenvalues_in_range_and_a_named_error_beyond():
    W = gaussian(12, 8, seed=7)
    W[3, 2] = 1e150  # λ_max ≈ 1e300: representable; the other entries are rounding beside it
    d = rs.diagnose(W, name="layers.0.mlp.up_proj.weight")
    ref = dense_eigenvalues(W / 1e150, 8)  # the rescaled matrix, by LAPACK
    assert d.lambda_max == pytest.approx(1e300 * ref[0], rel=1e-12)
    assert d.stable_rank == pytest.approx(1.0, rel=1e-12) and d.outliers == 1  # rank one at float64 precision
    W[3, 2] = 1e200  # λ_max ≈ 1e400: no float64 holds it (it used to come out as λ_max 0, 0 outliers, stable rank 0)
    with pytest.raises(InputError, match=r"layers\.0\.mlp\.up_proj\.weight: the spectrum overflows float64.*1e\+400"):
        rs.diagnose(W, name="layers.0.mlp.up_proj.weight")
    with pytest.raises(InputError, match=r"tiny: the spectrum underflows float64"):
        rs.diagnose(gaussian(12, 8) * 1e-160, name="tiny")  # λ ≈ 1e-320: subnormal, its digits lost


def test_a_huge_entry_inside_a_chain_that_its_partner_cancels_is_exact():
    A, C = gaussian(20, 5, seed=8), gaussian(5, 16, seed=9)
    A[0, 0] = 1e200
    d = rs.diagnose([A, C * 1e-200], name="head")  # the product is of unit size; A·C·1e-200 computed densely:
    assert_eigenvalues(d.eigenvalues, 1.0, dense_eigenvalues((A * 1e-200) @ C, 5))


def test_a_non_finite_intermediate_result_is_an_error_never_zeros(monkeypatch):
    monkeypatch.setattr(kernels, "squared_singular_values", lambda X: torch.full(X.shape[:-1], math.nan,
                                                                                 dtype=torch.float64))
    with pytest.raises(InputError, match=r"W: the spectrum is not finite"):
        rs.diagnose(gaussian(6, 4), name="W")


# ---------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize("fpr", ["0.1", 0, 0.6, 1, math.nan, math.inf, True, None, 1e-6, 1e-9, 0.99e-4])
def test_a_bad_fpr_is_an_input_error_saying_the_allowed_range(fpr):
    expected = r"fpr=.* is below 0\.0001, the smallest fpr allowed" if isinstance(fpr, float) and 0 < fpr < 1e-4 \
        else r"fpr must be a number in \(0, 0\.5\]"
    with pytest.raises(InputError, match=expected):
        rs.diagnose(gaussian(6, 4), fpr=fpr)


def test_the_smallest_fpr_allowed_places_its_edge_within_the_draw_budget():
    d = rs.diagnose(gaussian(6, 4), fpr=budget.MIN_FPR)  # the boundary itself: 40,000 counted draws
    assert d.fpr == budget.MIN_FPR and d.bulk_edge > 0
    assert math.ceil(budget.MIN_EXCEEDANCES / budget.MIN_FPR) <= budget.MAX_NULL_DRAWS


@pytest.mark.parametrize("draws", [0, -5, 2.5, True, budget.MAX_NULL_DRAWS + 1, 10**9])
def test_draws_outside_the_budget_are_refused(draws):
    with pytest.raises(InputError, match=r"draws must be a whole number of null draws in \[1, 40,000\]"):
        rs.diagnose(gaussian(6, 4), draws=draws)


def test_analyze_refuses_an_fpr_below_the_budget_before_reading_anything(monkeypatch, tmp_path):
    import rankscope.analysis as analysis

    def must_not_run(*a, **k):
        raise AssertionError("the checkpoint was read before the options were checked")

    monkeypatch.setattr(analysis, "_source", must_not_run)
    with pytest.raises(InputError, match=r"fpr=1e-06 is below 0\.0001"):
        rs.analyze(str(tmp_path), fpr=1e-6)


# ---------------------------------------------------------------------------------------------- Python API inputs


@pytest.mark.parametrize(("bad", "problem"), [
    (np.array([[1, 2], [3, 4]], dtype=object), "dtype object, not of numbers"),
    (np.array([["a", "b"], ["c", "d"]]), "not of numbers"),
    (torch.eye(4).to_sparse(), "torch.sparse_coo tensor; give a dense one"),
    (torch.empty(4, 4, device="meta"), "on the meta device"),
])
def test_diagnose_refuses_what_is_no_dense_matrix_by_name(bad, problem):
    with pytest.raises(InputError, match=rf"^q_proj\b.*{problem}"):
        rs.diagnose(bad, name="q_proj")
    with pytest.raises(InputError, match=rf"^head\b.*{problem}"):
        rs.diagnose([gaussian(4, 4), bad], name="head")


def test_analyze_refuses_a_model_without_values_and_what_is_no_model():
    meta = torch.nn.Linear(8, 8, device="meta")  # accelerate's init_empty_weights makes such models
    with pytest.raises(InputError, match=r"Linear: 'weight' is on the meta device"):
        rs.analyze(meta)
    sparse = torch.nn.Linear(8, 8)
    sparse.register_buffer("mask", torch.eye(8).to_sparse())
    with pytest.raises(InputError, match=r"Linear: 'mask' is a torch.sparse_coo tensor"):
        rs.analyze(sparse)
    with pytest.raises(InputError, match=r"expected a model \(nn.Module\) or the path of a checkpoint, got ndarray"):
        rs.analyze(np.zeros((4, 4)))


# ---------------------------------------------------------------------------------------------- checkpoints


def _one_line(result) -> str:
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


def _analyze_exits_2(path, *args) -> str:
    result = runner.invoke(app, ["analyze", str(path), *args], env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    return _one_line(result)


def _header_file(path, header: bytes, data: bytes = b"") -> None:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def _nothing_to_diagnose(tmp_path, case: str):
    if case == "conv only":
        torch.save({"conv.weight": torch.randn(4, 3, 3, 3)}, tmp_path / "conv.pt")
        return tmp_path / "conv.pt"
    if case == "1-D only":
        torch.save({"norm.weight": torch.randn(8), "head.bias": torch.randn(3)}, tmp_path / "oned.pt")
        return tmp_path / "oned.pt"
    if case == "{}":
        torch.save({}, tmp_path / "empty.pt")
        return tmp_path / "empty.pt"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    return tmp_path


@pytest.mark.parametrize("case", ["conv only", "1-D only", "{}", "an index with an empty weight_map"])
def test_a_checkpoint_with_no_matrix_is_one_line_and_exit_2(tmp_path, case):
    path = _nothing_to_diagnose(tmp_path, case)
    assert f"{path}: nothing to diagnose" in _analyze_exits_2(path)


def test_kinds_that_name_nothing_exit_2(tmp_path):
    save_file({"w.weight": torch.randn(8, 8)}, tmp_path / "w.safetensors")
    assert "unknown kinds []" in _analyze_exits_2(tmp_path / "w.safetensors", "--kinds", ",")


def test_an_index_may_not_name_a_file_outside_its_directory(tmp_path):
    save_file({"w.weight": torch.randn(8, 8)}, tmp_path / "outside.safetensors")
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    index = model / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w.weight": "../outside.safetensors"}}))
    line = _analyze_exits_2(model)
    assert f"{index}: shard '../outside.safetensors' lies outside the index's directory" in line
    index.write_text(json.dumps({"weight_map": {"w.weight": str(tmp_path / "outside.safetensors")}}))
    with pytest.raises(CheckpointError, match="lies outside the index's directory"):  # absolute: outside too
        load.open_checkpoint(model)
    save_file({"w.weight": torch.randn(8, 8)}, model / "sub" / "shard.safetensors")  # control: below it is fine
    index.write_text(json.dumps({"weight_map": {"w.weight": "sub/../sub/shard.safetensors"}}))
    assert load.open_checkpoint(model).names == ["w.weight"]


@pytest.mark.parametrize("header", [b"[" * 100_000 + b"]" * 100_000,
                                    b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"])
def test_a_header_nested_too_deep_is_refused_not_a_recursion_error(tmp_path, header):
    path = tmp_path / "deep.safetensors"
    _header_file(path, header)
    line = _analyze_exits_2(path)
    assert str(path) in line and ("nested too deep" in line or "not a JSON object" in line)


def test_a_header_declaring_a_million_tensors_is_refused_before_it_is_parsed(tmp_path, monkeypatch):
    path = tmp_path / "many.safetensors"
    entries = (b'"t%d":{"dtype":"F32","shape":[1],"data_offsets":[%d,%d]}' % (i, 4 * i, 4 * i + 4)
               for i in range(10**6))
    _header_file(path, b"{" + b",".join(entries) + b"}")  # 59 MB of header, no data: refused before the data check
    line = _analyze_exits_2(path)
    assert f"{path}: refused: the safetensors header declares 1,000,000 tensors, more than the 200,000" in line

    def parsed(*a, **k):
        raise AssertionError("the header was parsed")

    monkeypatch.setattr(load.json, "loads", parsed)  # refused from a count of its bytes, not by parsing them
    with pytest.raises(CheckpointError, match="declares 1,000,000 tensors"):
        load.open_checkpoint(path)


def test_a_header_of_millions_of_metadata_keys_is_refused_before_it_is_parsed(tmp_path, monkeypatch):
    """Entries without data_offsets (a huge __metadata__) are bounded too: by the count of JSON keys."""
    path = tmp_path / "meta.safetensors"
    keys = b",".join(b'"k%d":""' % i for i in range(2 * 10**6))
    _header_file(path, b'{"__metadata__":{' + keys + b'}}')  # 27 MB, under the byte bound, no tensor at all

    def parsed(*a, **k):
        raise AssertionError("the header was parsed")

    monkeypatch.setattr(load.json, "loads", parsed)
    with pytest.raises(CheckpointError, match=r"has 2,000,001 keys or more, more than the 1,600,000 \(8 per tensor\)"):
        load.open_checkpoint(path)
    monkeypatch.undo()
    real = tmp_path / "real.safetensors"  # a real file with metadata stays well inside the bound
    save_file({f"w{i}.weight": torch.randn(2, 2) for i in range(4)}, real, metadata={"format": "pt", "a": "b"})
    assert len(load.open_checkpoint(real).names) == 4


def test_the_tensor_bound_is_a_bound_at_its_value(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    save_file({f"w{i}.weight": torch.randn(2, 2) for i in range(4)}, path)
    monkeypatch.setattr(load, "MAX_TENSORS", 4)
    assert len(load.open_checkpoint(path).names) == 4  # at the bound: read
    monkeypatch.setattr(load, "MAX_TENSORS", 3)
    with pytest.raises(CheckpointError, match="declares 4 tensors, more than the 3"):
        load.open_checkpoint(path)


def test_a_header_longer_than_the_bound_is_refused_from_its_length(tmp_path):
    path = tmp_path / "long.safetensors"
    path.write_bytes(struct.pack("<Q", load.MAX_HEADER_BYTES + 1) + b"{}")
    assert f"{path}: refused: the safetensors header is 100,000,001 bytes long" in _analyze_exits_2(path)


@pytest.mark.parametrize(("tensor", "problem"), [
    (torch.eye(8).to_sparse(), "tensor 'w' is a torch.sparse_coo tensor; rankscope reads dense weights"),
    (torch.empty(8, 8, device="meta"), "tensor 'w' is a meta tensor"),
])
def test_a_torch_file_with_sparse_or_meta_tensors_is_refused(tmp_path, tensor, problem):
    path = tmp_path / "w.pt"
    torch.save({"w": tensor, "dense.weight": torch.randn(8, 8)}, path)
    assert f"{path}: {problem}" in _analyze_exits_2(path)


@pytest.mark.parametrize("value", [0, -2, 2.5, "8", True])
def test_a_config_with_no_heads_is_refused_naming_its_field(tmp_path, value):
    config = {"model_type": "llama", "hidden_size": 8, "num_attention_heads": value, "num_hidden_layers": 1}
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({f"model.layers.0.self_attn.{p}_proj.weight": torch.randn(8, 8) for p in "qkvo"},
              tmp_path / "model.safetensors")
    line = _analyze_exits_2(tmp_path)
    assert f"{tmp_path / 'config.json'}: num_attention_heads is {value!r}; a head count or width must be a positive" \
           in line


# ---------------------------------------------------------------------------------------------- --out


@pytest.fixture
def small(tmp_path):
    save_file({"w.weight": torch.randn(8, 8)}, tmp_path / "w.safetensors")
    return tmp_path / "w.safetensors"


def test_out_that_is_a_file_or_lies_under_one_exits_2_before_any_work(monkeypatch, small, tmp_path):
    import rankscope.analysis as analysis

    def must_not_run(*a, **k):
        raise AssertionError("the checkpoint was read before --out was checked")

    monkeypatch.setattr(analysis, "_source", must_not_run)
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert f"--out {afile}: exists and is not a directory" in _analyze_exits_2(small, "--out", str(afile))
    line = _analyze_exits_2(small, "--out", str(afile / "sub" / "dir"))
    assert f"--out {afile / 'sub' / 'dir'}: cannot be made, {afile} is a file" in line


def test_out_in_a_read_only_directory_exits_2_before_any_work(small, tmp_path):
    """A real mode-555 directory, in a child that has no root override (tests/privileges.py), as for any user."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        code = "import sys; from rankscope.cli import run; sys.argv[0] = 'rankscope'; run()"
        done = subprocess.run([sys.executable, "-c", code, "analyze", str(small), "--out", str(ro / "rows")],
                              capture_output=True, text=True, timeout=120, preexec_fn=as_a_plain_user(),
                              env={**os.environ, "COLUMNS": "200"})
        assert done.returncode == 2, done.stdout + done.stderr
        lines = [ln for ln in (done.stdout + done.stderr).splitlines() if ln.strip()]
        assert len(lines) == 1 and f"--out {ro / 'rows'}: cannot be made: {ro} is not writable" in lines[0], lines
        assert not (ro / "rows").exists()
    finally:
        ro.chmod(0o755)


def test_a_rows_file_that_cannot_be_written_after_all_is_one_line_and_exit_2(monkeypatch, small, tmp_path):
    import rankscope.commands.analyze as command

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(command, "_write_rows", read_only)  # e.g. the disk remounted read-only during the analysis
    result = runner.invoke(app, ["analyze", str(small), "--out", str(tmp_path / "rows"), "--no-figure"],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output  # after the tables: the one error line, no traceback
    last = result.output.strip().splitlines()[-1]
    assert last == f"error: --out {tmp_path / 'rows'}: cannot write the rows file (Read-only file system)"
    assert "Traceback" not in result.output


def test_a_gguf_file_with_no_heads_is_refused_naming_its_field(tmp_path):
    import gguf  # a dependency of rankscope (probes.gguf)
    path = tmp_path / "model.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_embedding_length(8)
    w.add_block_count(1)
    w.add_head_count(0)
    for t in ("attn_q", "attn_k", "attn_v", "attn_output"):
        w.add_tensor(f"blk.0.{t}.weight", np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    line = _analyze_exits_2(path)
    assert f"{path}: num_attention_heads is 0; a head count or width must be a positive integer" in line


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "foreign"])
def test_a_damaged_cached_null_is_simulated_again_with_a_warning_and_rewritten(tmp_path, monkeypatch, damage):
    import hashlib

    from rankscope.spectra import nullcache

    monkeypatch.setenv("RANKSCOPE_CACHE_DIR", str(tmp_path))
    made = []

    def make():
        made.append(1)
        return {"t": np.arange(1000, dtype=np.float64)}

    key = ("test", (3, 4), (), 1000)
    fresh = nullcache.NullCache()
    assert fresh.get(key, make)["t"].sum() == 499500.0 and len(made) == 1
    path = tmp_path / f"{hashlib.sha256(nullcache._text(key).encode()).hexdigest()[:32]}.npz"
    good = path.read_bytes()
    bad = {"truncated": good[: len(good) // 2], "foreign": b"not a zip file at all",
           "flipped byte": good[:200] + bytes([good[200] ^ 0xFF]) + good[201:]}[damage]
    path.write_bytes(bad)
    with pytest.warns(UserWarning, match="damaged cached null"):
        again = nullcache.NullCache().get(key, make)  # a new process: nothing in memory
    assert again["t"].sum() == 499500.0 and len(made) == 2  # simulated again, not read
    assert path.read_bytes() == good  # and rewritten whole
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the healed file reads without a word
        nullcache.NullCache().get(key, make)
    assert len(made) == 2
