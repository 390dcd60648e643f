"""The Monitor inside other training loops: Hugging Face Trainer and Lightning callbacks, and TensorBoard scalars.

Each test trains a tiny model for a few steps and reads back what landed in the run store: the rows expected
for every diagnosed step, the loop's own logged losses, and a metric recomputed from the weights with a
dense SVD (so a row diagnosed on stale or wrong weights fails)."""

import pickle
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import rankscope as rs
from rankscope.store import RunStore
from rankscope.train.monitor import Monitor

NULLS = {"product", "mp"}


pytestmark = pytest.mark.usefixtures("one_thread")


def attention_keys(steps, layers, heads):
    """The (step, layer, head, kind, null) keys the qk table must hold: layer rows (head −1) and every head."""
    return {(s, layer, h, kind, null) for s in steps for layer in layers for h in (-1, *heads)
            for kind in ("qk", "ov") for null in NULLS}


def stored_keys(run_dir):
    frame = RunStore(run_dir).sql('select step, layer, head_index, kind, "null" from attention')
    return {(int(s), int(layer), int(h), k, n) for s, layer, h, k, n in frame.itertuples(index=False)}


def dense_stable_rank(wq, wk, head, n_head, n_kv_head):
    """Stable rank Σσ²/σ_max² of B_h = Wq_hᵀ Wk_g(h), from the dense d×d matrix (PyTorch weights [out, in])."""
    dh = wq.shape[0] // n_head
    g = head // (n_head // n_kv_head)
    b = wq[head * dh:(head + 1) * dh].double().T @ wk[g * dh:(g + 1) * dh].double()  # (d, d)
    s2 = torch.linalg.svdvals(b) ** 2
    return float(s2.sum() / s2.max())


def stored_stable_rank(run_dir, step, layer, head):
    frame = RunStore(run_dir).sql(f"""select stable_rank from qk where step = {step} and layer = {layer}
                                      and head_index = {head} and kind = 'qk' and "null" = 'product'""")
    assert len(frame) == 1
    return float(frame["stable_rank"].iloc[0])


def test_module_imports_without_transformers_or_lightning_and_names_the_extra():
    code = """
import sys
sys.modules.update({"transformers": None, "lightning": None, "lightning.pytorch": None, "pytorch_lightning": None})
import rankscope.train.integrations as integ
for name, extra in (("RankscopeCallback", "rankscope[hf]"), ("RankscopeLightningCallback", "rankscope[lightning]")):
    try:
        getattr(integ, name)
    except ImportError as exc:
        assert extra in str(exc), exc
    else:
        raise AssertionError(name + " built without its package")
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


class RandomTokens(torch.utils.data.Dataset):
    """Random token sequences as a causal-LM dataset (labels = inputs; the model shifts them)."""

    def __init__(self, n=16, length=12, vocab=64, seed=0):
        self.tokens = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def test_hf_trainer_callback_writes_every_head_at_the_diagnosed_steps_and_the_logged_losses(tmp_path):
    transformers = pytest.importorskip("transformers")
    from rankscope.train.integrations import RankscopeCallback

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(config)
    q0 = model.model.layers[1].self_attn.q_proj.weight.detach().clone()
    k0 = model.model.layers[1].self_attn.k_proj.weight.detach().clone()
    run_dir = tmp_path / "run"
    callback = RankscopeCallback(run_dir, every=3, kinds=("qk", "ov"))
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=2,
                                          logging_steps=2, report_to=[], use_cpu=True, save_strategy="no",
                                          learning_rate=1e-2, disable_tqdm=True, eval_strategy="steps", eval_steps=2)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=RandomTokens(),
                                   eval_dataset=RandomTokens(n=4, seed=1), callbacks=[callback])
    trainer.train()

    assert stored_keys(run_dir) == attention_keys(steps=(0, 3, 6), layers=(0, 1), heads=range(4))
    variants = RunStore(run_dir).sql("select distinct variant from qk where head_index = -1 and kind = 'qk'")
    assert list(variants["variant"]) == ["gqa"]
    # step 0 holds the initial weights, step 6 the trained ones (they moved: lr 1e-2)
    attn = model.model.layers[1].self_attn
    for step, wq, wk in ((0, q0, k0), (6, attn.q_proj.weight.detach(), attn.k_proj.weight.detach())):
        assert stored_stable_rank(run_dir, step, 1, 3) == pytest.approx(dense_stable_rank(wq, wk, 3, 4, 2), rel=1e-6)
    assert dense_stable_rank(q0, k0, 3, 4, 2) != pytest.approx(stored_stable_rank(run_dir, 6, 1, 3), rel=1e-6)

    # the Trainer logs loss and eval_loss of one step in two calls: both land in that step's row
    logged = {}
    for entry in trainer.state.log_history:
        logged.setdefault(entry["step"], {}).update(entry)
    assert sorted(logged) == [2, 4, 6] and all("eval_loss" in logged[s] and "loss" in logged[s] for s in logged)
    train = RunStore(run_dir).sql("select step, loss, eval_loss, learning_rate from train order by step")
    assert list(train["step"]) == [2, 4, 6]
    for key in ("loss", "eval_loss", "learning_rate"):
        np.testing.assert_allclose(train[key], [logged[s][key] for s in (2, 4, 6)], rtol=1e-12)
    assert callback.monitor.seconds > 0 and callback.monitor.calls == 3


def test_hf_callback_survives_pickling():
    pytest.importorskip("transformers")
    from rankscope.train.integrations import RankscopeCallback

    copy = pickle.loads(pickle.dumps(RankscopeCallback("runs/x", every=7)))
    assert type(copy) is RankscopeCallback and copy.every == 7


def lightning_module(losses):
    """A LightningModule holding a one-layer rankscope GPT; it records the loss of every training step."""
    pl = pytest.importorskip("lightning.pytorch")
    from rankscope.nn import GPT, ModelConfig

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = GPT(ModelConfig(vocab_size=64, n_layer=1, d_model=32, n_head=2, max_seq_len=16))

        def training_step(self, batch, batch_idx):
            (tokens,) = batch
            _, loss = self.model(tokens[:, :-1], tokens[:, 1:])
            self.log("train_loss", loss)
            losses.append(float(loss.detach()))
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    return pl, Tiny()


def test_lightning_callback_diagnoses_the_inner_model_and_logs_the_callback_metrics(tmp_path):
    losses = []
    pl, module = lightning_module(losses)
    from rankscope.train.integrations import RankscopeLightningCallback

    torch.manual_seed(0)
    tokens = torch.randint(0, 64, (12, 9), generator=torch.Generator().manual_seed(1))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens), batch_size=2)
    run_dir = tmp_path / "run"
    callback = RankscopeLightningCallback(run_dir, every=3, kinds=("qk", "ov"))
    trainer = pl.Trainer(max_steps=6, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=2,
                         callbacks=[callback])
    trainer.fit(module, loader)

    assert callback.monitor.model is module.model  # found inside the LightningModule
    assert stored_keys(run_dir) == attention_keys(steps=(0, 3, 6), layers=(0,), heads=range(2))
    variants = RunStore(run_dir).sql("select distinct variant from qk where kind = 'qk'")
    assert list(variants["variant"]) == ["mha"]
    attn = module.model.blocks[0].attn
    expected = dense_stable_rank(attn.q_proj.weight.detach(), attn.k_proj.weight.detach(), 1, 2, 2)
    assert stored_stable_rank(run_dir, 6, 0, 1) == pytest.approx(expected, rel=1e-6)

    train = RunStore(run_dir).sql("select step, train_loss from train order by step")
    # one row per optimizer step (two micro-batches each), holding the loss of the batch that completed it
    assert len(losses) == 12 and list(train["step"]) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(train["train_loss"], losses[1::2], rtol=1e-6)
    assert callback.monitor.seconds > 0 and callback.monitor.calls == 3


def test_monitor_writes_tensorboard_scalars_equal_to_the_store(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rankscope.nn import GPT, ModelConfig

    assert rs.Monitor is Monitor and rs.RunStore is RunStore  # the public names of DESIGN §3
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, n_layer=1, d_model=32, n_head=2, max_seq_len=16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(2))
    run_dir = tmp_path / "run"
    mon = rs.Monitor(model, run_dir, every=2, kinds=("qk",))
    losses = {}
    for step in range(5):
        mon.step(step)
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses[step] = float(loss.detach())
        mon.log(step, loss=losses[step])
    mon.close()

    events = list((run_dir / "events").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    board = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert sorted(board) == list(range(5))
    np.testing.assert_allclose([board[s] for s in range(5)], [losses[s] for s in range(5)], rtol=1e-6)
    for null in ("product", "mp"):
        frame = RunStore(run_dir).sql(f"""select step, outliers, spike_strength from qk where layer = 0
                                          and head_index = -1 and kind = 'qk' and "null" = '{null}' order by step""")
        assert list(frame["step"]) == [0, 2, 4]
        for key in ("outliers", "spike_strength"):
            events = acc.Scalars(f"qk_{null}/layer0/{key}")
            assert [e.step for e in events] == [0, 2, 4]
            np.testing.assert_allclose([e.value for e in events], frame[key], rtol=1e-6)


def test_only_the_main_process_writes_and_module_names_the_model(tmp_path):
    pytest.importorskip("transformers")
    _, module = lightning_module([])
    from rankscope.nn import GPT, ModelConfig
    from rankscope.train.integrations import RankscopeCallback, RankscopeLightningCallback

    hf = RankscopeCallback(tmp_path / "hf", every=1)
    state = SimpleNamespace(is_world_process_zero=False, global_step=0)
    hf.on_train_begin(None, state, None, model=module.model)
    hf.on_step_end(None, state, None)
    hf.on_log(None, state, None, logs={"loss": 1.0})
    hf.on_train_end(None, state, None)
    light = RankscopeLightningCallback(tmp_path / "pl", every=1)
    light.on_train_start(SimpleNamespace(is_global_zero=False, global_step=0), module)
    assert hf.monitor is None and light.monitor is None and not list(tmp_path.iterdir())

    module.other = GPT(ModelConfig(vocab_size=64, n_layer=1, d_model=32, n_head=2, max_seq_len=16))
    chosen = RankscopeLightningCallback(tmp_path / "pl", every=1, module="other", kinds=("qk",), per_head=False)
    chosen.on_train_start(SimpleNamespace(is_global_zero=True, global_step=0), module)
    chosen.on_train_end(None, module)
    assert chosen.monitor.model is module.other  # not module.model, which the search would find first
    rows = RunStore(tmp_path / "pl").sql('select step, layer, head_index, kind, "null" from attention order by "null"')
    assert [tuple(r) for r in rows.itertuples(index=False)] == [(0, 0, -1, "qk", "mp"), (0, 0, -1, "qk", "product")]
