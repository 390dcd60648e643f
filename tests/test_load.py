"""probes.load: every accepted layout round-trips exactly; every bad input gives one clear CheckpointError."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rankscope.errors import CheckpointError
from rankscope.probes.load import Checkpoint, open_checkpoint


def _weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "layers.0.attn.q.weight": torch.randn(4, 3, generator=g),
        "layers.0.attn.k.weight": torch.randn(4, 3, generator=g).to(torch.bfloat16),
        "layers.1.mlp.weight": torch.randn(2, 5, generator=g, dtype=torch.float64),
        "embed.weight": torch.randn(6, 3, generator=g).to(torch.float16),
        "layers.1.norm.step": torch.arange(3, dtype=torch.int64),
    }


def _assert_round_trip(ckpt: Checkpoint, saved: dict[str, torch.Tensor]) -> None:
    assert sorted(ckpt.names) == sorted(saved)
    for name, want in saved.items():
        got = ckpt.tensor(name)
        assert got.dtype == want.dtype == ckpt.dtype(name)
        assert tuple(got.shape) == tuple(want.shape) == ckpt.shape(name)
        assert torch.equal(got, want)  # bit-exact: no cast, no rounding
    assert list(ckpt.tensors(ckpt.names[::-1])) == ckpt.names[::-1]


def _shard(saved: dict[str, torch.Tensor], d: Path, ext: str, fmt: str) -> Path:
    """Two shards + an index, HF style; returns the index path."""
    names = list(saved)
    parts = {fmt.format(1): names[:2], fmt.format(2): names[2:]}
    for shard, keys in parts.items():
        part = {k: saved[k] for k in keys}
        save_file(part, d / shard) if ext == "safetensors" else torch.save(part, d / shard)
    index = d / f"{'model.safetensors' if ext == 'safetensors' else 'pytorch_model.bin'}.index.json"
    weight_map = {k: shard for shard, keys in parts.items() for k in keys}
    index.write_text(json.dumps({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}))
    return index


# ------------------------------------------------------------------------------------------- round trips


def test_single_safetensors_file(tmp_path):
    saved = _weights()
    save_file(saved, tmp_path / "w.safetensors")
    ckpt = open_checkpoint(str(tmp_path / "w.safetensors"))
    assert ckpt.config is None
    assert ckpt.dtype("layers.0.attn.k.weight") == torch.bfloat16
    _assert_round_trip(ckpt, saved)
    # Name order is the file's data order, the same on every open.
    assert open_checkpoint(tmp_path / "w.safetensors").names == ckpt.names


def test_hf_dir_prefers_safetensors_and_reads_config(tmp_path):
    saved = _weights()
    save_file(saved, tmp_path / "model.safetensors")
    torch.save({"other": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.config == {"model_type": "gpt2", "n_layer": 2}
    _assert_round_trip(ckpt, saved)


@pytest.mark.parametrize("ext,fmt", [("safetensors", "model-0000{}-of-00002.safetensors"),
                                     ("bin", "pytorch_model-0000{}-of-00002.bin")])  # fmt: skip
def test_sharded_index(tmp_path, ext, fmt):
    saved = _weights()
    index = _shard(saved, tmp_path, ext, fmt)
    (tmp_path / "config.json").write_text("{}")
    for path in (tmp_path, index):
        ckpt = open_checkpoint(path)
        assert ckpt.config == {}
        _assert_round_trip(ckpt, saved)
        # Shard 1's tensors come first (shard order), and the order is stable across opens.
        assert set(ckpt.names[:2]) == set(list(saved)[:2])
        assert open_checkpoint(path).names == ckpt.names


@pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_torch_state_dict(tmp_path, wrap, suffix):
    saved = _weights()
    obj = saved if wrap is None else {wrap: saved, "step": 7, "optimizer": {"lr": 0.1}}
    torch.save(obj, tmp_path / f"ckpt{suffix}")
    ckpt = open_checkpoint(tmp_path / f"ckpt{suffix}")
    assert ckpt.names == list(saved)  # a state dict keeps its insertion (module) order
    _assert_round_trip(ckpt, saved)


def test_legacy_torch_format_and_hf_bin_dir(tmp_path):
    saved = _weights()
    torch.save(saved, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.config is None and ckpt.names == list(saved)
    _assert_round_trip(ckpt, saved)


def test_module_state_dict(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4)).to(torch.bfloat16)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    ckpt = open_checkpoint(tmp_path / "m.pt")
    assert ckpt.names == ["0.weight", "0.bias", "1.weight", "1.bias"]
    _assert_round_trip(ckpt, model.state_dict())


# ------------------------------------------------------------------------------------------- bad input


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.safetensors: no such file or directory$"):
        open_checkpoint(tmp_path / "nope.safetensors")


def test_dir_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r": no weights found \(looked for model\.safetensors.*pytorch_model"):
        open_checkpoint(tmp_path)


def test_unknown_file_type(tmp_path):
    (tmp_path / "w.npz").write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"w\.npz: unknown file type '\.npz' \(accepted: .*\.safetensors.*\.pt"):
        open_checkpoint(tmp_path / "w.npz")


def _truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


@pytest.mark.parametrize(
    "cut,problem",
    [
        (5, "5 bytes, shorter than the 8-byte header length"),
        (40, "header length says"),
        (-7, "data is .* the header needs"),
    ],
)
def test_truncated_safetensors(tmp_path, cut, problem):
    f = tmp_path / "w.safetensors"
    save_file(_weights(), f)
    _truncate(f, cut if cut > 0 else f.stat().st_size + cut)
    with pytest.raises(CheckpointError, match=rf"w\.safetensors: corrupt or truncated safetensors file \({problem}"):
        open_checkpoint(f)


def test_corrupt_safetensors_header(tmp_path):
    f = tmp_path / "w.safetensors"
    header = b'{"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}}'  # 4 floats need 16 bytes
    f.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"corrupt or truncated safetensors file \(tensor 'w' .* needs 16 bytes"):
        open_checkpoint(f)
    f.write_bytes(struct.pack("<Q", 5) + b"{oops" + b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"corrupt or truncated safetensors file \(header is not valid JSON"):
        open_checkpoint(f)


def test_corrupt_torch_file(tmp_path):
    f = tmp_path / "w.pt"
    torch.save(_weights(), f)
    _truncate(f, 300)
    with pytest.raises(CheckpointError, match=r"w\.pt: corrupt or truncated torch file \(") as err:
        open_checkpoint(f)
    assert "\n" not in str(err.value)


def _plant(marker: str) -> None:
    Path(marker).write_text("code ran")


class _Evil:
    """Unpickling this runs code: _plant(marker), or os.system("touch marker")."""

    def __init__(self, marker: Path, shell: bool):
        self.marker, self.shell = str(marker), shell

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",)) if self.shell else (_plant, (self.marker,))


@pytest.mark.parametrize("shell", [False, True])
@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_pickled_code_is_refused_not_run(tmp_path, shell, writer):
    marker = tmp_path / "PWNED"
    f = tmp_path / "evil.pt"
    if writer == "torch.save":
        torch.save({"w": torch.ones(2), "x": _Evil(marker, shell)}, f)
    else:  # a raw pickle (no tensors: plain pickle would itself reference torch's rebuild functions)
        f.write_bytes(pickle.dumps({"x": _Evil(marker, shell)}, protocol=2))
    with pytest.raises(CheckpointError, match=r"evil\.pt: refused: the file contains pickled code, which rankscope "
                       r"never executes \(it imports (posix\.system|.*_plant)") as err:  # fmt: skip
        open_checkpoint(f)
    assert "\n" not in str(err.value)
    assert not marker.exists()
    # The payload is live: a plain unpickler would have run it (so the check above means something).
    if writer == "pickle" and not shell:
        pickle.loads(f.read_bytes())
        assert marker.exists()


@pytest.mark.parametrize("content", ["protocol-4 pickle", "junk"])
def test_not_a_torch_file(tmp_path, content):
    marker = tmp_path / "PWNED"
    f = tmp_path / "evil.bin"
    f.write_bytes(pickle.dumps({"x": _Evil(marker, False)}, protocol=4) if content != "junk" else b"garbage")
    with pytest.raises(CheckpointError, match=r"evil\.bin: corrupt or not a torch file \(the weights-only unpickler"):
        open_checkpoint(f)
    assert not marker.exists()


@pytest.mark.parametrize(
    "obj,problem",
    [(torch.ones(2), "holds a Tensor"), ({"w": torch.ones(2), "n": 3}, "entry 'n' is a int"), ([1, 2], "holds a list")],
)
def test_not_a_state_dict(tmp_path, obj, problem):
    torch.save(obj, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=rf"x\.pt: not a state dict \({problem}"):
        open_checkpoint(tmp_path / "x.pt")


def test_index_with_missing_shard(tmp_path):
    index = _shard(_weights(), tmp_path, "safetensors", "model-0000{}-of-00002.safetensors")
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"index\.json: shard 'model-00002-of-00002\.safetensors' is missing"):
        open_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=r"shard 'model-00002-of-00002\.safetensors' is missing"):
        open_checkpoint(index)


def test_index_naming_absent_tensor_and_bad_index(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "s.safetensors")
    index = tmp_path / "x.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "s.safetensors", "b": "s.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"s\.safetensors: lacks tensor 'b' that x\.index\.json places there"):
        open_checkpoint(index)
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match=r"x\.index\.json: not a sharded index"):
        open_checkpoint(index)


def test_unknown_tensor_name(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match=r"w\.safetensors: no tensor named 'b'"):
        open_checkpoint(tmp_path / "w.safetensors").tensor("b")


def _hub_cache(root, repo_id: str) -> None:
    """A Hugging Face cache holding one snapshot of ``repo_id`` (the layout huggingface_hub writes)."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    save_file({"w": torch.arange(6.0).reshape(2, 3)}, snap / "model.safetensors")
    (snap / "config.json").write_text('{"model_type": "toy"}')


@pytest.mark.parametrize("repo_id", ["some-org/some-model", "bare-model"])
def test_hub_id_offline(monkeypatch, tmp_path, repo_id):
    import huggingface_hub.constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointError, match=rf"^{repo_id}: no such file or directory, not in the local Hugging "
                                              r"Face cache, and HF_HUB_OFFLINE is set"):
        open_checkpoint(repo_id)
    _hub_cache(tmp_path / "hub", repo_id)  # now the cache has it: read offline, from the cache
    ckpt = open_checkpoint(repo_id)
    assert ckpt.config == {"model_type": "toy"}
    assert torch.equal(ckpt.tensor("w"), torch.arange(6.0).reshape(2, 3))
    with pytest.raises(CheckpointError, match=r"missing\.safetensors: no such file or directory"):
        open_checkpoint("missing.safetensors")  # a file name is never taken for a hub id


def test_safetensors_error_from_the_library_is_one_line(tmp_path):
    f = tmp_path / "w.safetensors"
    header = b'{"w": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}'  # a dtype safetensors does not know
    f.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"w\.safetensors: corrupt or truncated safetensors file \(.+\)$") as err:
        open_checkpoint(f)
    assert "\n" not in str(err.value)
