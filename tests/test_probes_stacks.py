"""Probes of encoders and of models with several attention stacks (``probes.stacks``) against the models' own
attention: DistilBERT, ViT, T5 (encoder, decoder, cross-attention), CLIP (text and vision towers) and CLIP's
single-tower models.

As in ``test_probes``: a tiny random float64 transformers model, attention weights re-drawn, biases zeroed (forms
exclude biases), one forward pass with hooks on the projections. Per stack, layer and head, with x the hidden
state entering the query projection and y the one entering the key/value projections (y = x in self-attention;
in T5's cross-attention y is the encoder's output, checked against the model's ``encoder_last_hidden_state``):

1. logits: the model's own q_h(x_i)·k_h(y_j) = x_iᵀ B_h y_j (rtol 1e-8); the layer form is the sum over heads.
2. ov: the model's output projection of head h's value alone (other heads zero) = (Wo_h Wv_h) y_j.
3. attention probabilities (eager attention, ``output_attentions``): log p_ij − log p_i0 = scale·(s_ij − s_i0)
   + (b_ij − b_i0), with s from the form, scale = 1/√(head dim) (T5: 1, it does not scale) and b T5's relative
   position bias as the model's own ``compute_bias`` gives it (zero elsewhere, and in cross-attention); on the
   causal triangle for CLIP's text tower and T5's decoder. CLIP and ViT take the softmax in float32 (atol 1e-5),
   DistilBERT and T5 in float64 (atol 1e-9).

Every check runs on the forms read from the model's in-memory state dict with its config object, and from the
checkpoint ``save_pretrained`` writes (its ``config.json`` as a plain dict, and its parameter names, which for ViT
are the on-disk names ``encoder.layer.{i}.attention.attention.query``, not transformers 5's ``layers.{i}.attention.
q_proj``).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import rankscope
from formtools import multiplied_out
from rankscope.errors import CheckpointError, InputError
from rankscope.probes import detect_architecture, hf_forms
from test_probes import VOCAB, Capture, _heads, _ov, _reinit, _transformers

pytestmark = pytest.mark.usefixtures("one_thread")

T_ENC, T_DEC = 6, 5  # tokens into the encoder (and the text towers), into T5's decoder
IMAGE = dict(image_size=8, patch_size=4, num_channels=3)  # 4 patches + the class token


def _redraw(model, gen: torch.Generator) -> None:
    """``test_probes._reinit``, and T5's attention weights (its modules are ``SelfAttention``, ``EncDecAttention``)."""
    _reinit(model, gen)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "Attention." in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _pixels() -> torch.Tensor:
    return torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


# ---- the models: (model class, config, inputs) and the attention sites of its forward pass ------------------

def _site(stack, layer, attn, q, k, v, o, heads, scale, probs, causal=False, bias=None, keys=None):
    """One attention layer as the model ran it: module names of its projections and what the model reported."""
    return dict(stack=stack, layer=layer, q=attn + q, k=attn + k, v=attn + v, o=attn + o, heads=heads, scale=scale,
                probs=probs[layer][0], causal=causal, bias=bias, keys=keys)


def _sites_distilbert(model, out):
    H = model.config.n_heads
    return [_site("", i, f"transformer.layer.{i}.attention.", "q_lin", "k_lin", "v_lin", "out_lin", H,
                  (model.config.dim // H) ** -0.5, out.attentions) for i in range(2)]


def _sites_vit(model, out):
    H = model.config.num_attention_heads
    return [_site("", i, f"layers.{i}.attention.", "q_proj", "k_proj", "v_proj", "o_proj", H,
                  (model.config.hidden_size // H) ** -0.5, out.attentions) for i in range(2)]


def _sites_t5(model, out):
    H = model.config.num_heads
    enc_bias = model.encoder.block[0].layer[0].SelfAttention.compute_bias(T_ENC, T_ENC)[0]  # (H, T, T)
    dec_bias = model.decoder.block[0].layer[0].SelfAttention.compute_bias(T_DEC, T_DEC)[0]
    sites = []
    for i in range(2):
        sites.append(_site("encoder", i, f"encoder.block.{i}.layer.0.SelfAttention.", "q", "k", "v", "o", H, 1.0,
                           out.encoder_attentions, bias=enc_bias))
        sites.append(_site("decoder", i, f"decoder.block.{i}.layer.0.SelfAttention.", "q", "k", "v", "o", H, 1.0,
                           out.decoder_attentions, causal=True, bias=dec_bias))
        sites.append(_site("cross", i, f"decoder.block.{i}.layer.1.EncDecAttention.", "q", "k", "v", "o", H, 1.0,
                           out.cross_attentions, keys=out.encoder_last_hidden_state[0]))
    return sites


def _tower(stack, path, config, probs, causal):
    H = config.num_attention_heads
    return [_site(stack, i, f"{path}encoder.layers.{i}.self_attn.", "q_proj", "k_proj", "v_proj", "out_proj", H,
                  (config.hidden_size // H) ** -0.5, probs, causal=causal) for i in range(2)]


def _sites_clip(model, out):
    return (_tower("text", "text_model.", model.config.text_config, out.text_model_output.attentions, True)
            + _tower("vision", "vision_model.", model.config.vision_config, out.vision_model_output.attentions, False))


def _sites_clip_text(model, out):  # CLIPTextModelWithProjection: its names start with text_model.
    return _tower("text", "text_model.", model.config, out.attentions, True)


def _sites_clip_vision(model, out):  # CLIPVisionModel: transformers 5 names it without vision_model.
    return _tower("vision", "", model.config, out.attentions, False)


LAYERS = dict(num_hidden_layers=2, intermediate_size=16)
TEXT = dict(LAYERS, vocab_size=VOCAB, hidden_size=16, num_attention_heads=4, max_position_embeddings=16,
            bos_token_id=0, eos_token_id=1, pad_token_id=0)
VISION = dict(LAYERS, **IMAGE, hidden_size=24, num_attention_heads=3)
T5_KW = dict(vocab_size=VOCAB, d_model=16, d_kv=5, num_heads=3, num_layers=2, d_ff=16, dropout_rate=0.0,
             relative_attention_num_buckets=8, relative_attention_max_distance=16, decoder_start_token_id=0)

CASES = {  # name → (model class, config class, config kwargs, inputs, sites, softmax atol)
    "distilbert": ("DistilBertModel", "DistilBertConfig",
                   dict(vocab_size=VOCAB, dim=16, n_heads=4, n_layers=2, hidden_dim=16, dropout=0.0,
                        attention_dropout=0.0), lambda: dict(input_ids=_ids(T_ENC, 2)), _sites_distilbert, 1e-9),
    "vit": ("ViTModel", "ViTConfig", dict(LAYERS, **IMAGE, hidden_size=16, num_attention_heads=4,
                                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
            lambda: dict(pixel_values=_pixels()), _sites_vit, 1e-5),
    "t5": ("T5Model", "T5Config", T5_KW,
           lambda: dict(input_ids=_ids(T_ENC, 2), decoder_input_ids=_ids(T_DEC, 4), use_cache=False), _sites_t5,
           1e-9),
    "mt5": ("MT5Model", "MT5Config", T5_KW,
            lambda: dict(input_ids=_ids(T_ENC, 2), decoder_input_ids=_ids(T_DEC, 4), use_cache=False), _sites_t5,
            1e-9),
    "clip": ("CLIPModel", "CLIPConfig", dict(text_config=TEXT, vision_config=VISION, projection_dim=8),
             lambda: dict(input_ids=_ids(T_ENC, 2), pixel_values=_pixels()), _sites_clip, 1e-5),
    "clip_text_model": ("CLIPTextModelWithProjection", "CLIPTextConfig", dict(TEXT, projection_dim=8),
                        lambda: dict(input_ids=_ids(T_ENC, 2)), _sites_clip_text, 1e-5),
    "clip_vision_model": ("CLIPVisionModel", "CLIPVisionConfig", VISION, lambda: dict(pixel_values=_pixels()),
                          _sites_clip_vision, 1e-5),
}


def _build(case: str):
    model_name, config_name, kwargs, _, _, _ = CASES[case]
    transformers = _transformers()
    cfg = getattr(transformers, config_name)(**kwargs)
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(cfg).double().eval()
    model.set_attn_implementation("eager")
    _redraw(model, torch.Generator().manual_seed(1))
    return model, model.config


def _saved(model, tmp_path) -> tuple[dict, dict]:
    """(config.json as a plain dict, the state dict) of the checkpoint ``save_pretrained`` writes."""
    model.save_pretrained(tmp_path)
    return json.loads((tmp_path / "config.json").read_text()), load_file(tmp_path / "model.safetensors")


@pytest.mark.parametrize("case", list(CASES))
def test_chains_reproduce_attention_logits(case, tmp_path):
    _, _, _, inputs, sites_of, prob_atol = CASES[case]
    model, cfg = _build(case)
    names = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in
             ("q_lin", "k_lin", "v_lin", "q_proj", "k_proj", "v_proj", "q", "k", "v")]
    cap = Capture(model, names)
    with torch.no_grad():
        out = model(**inputs(), output_attentions=True)
    cap.remove()
    sites = sites_of(model, out)
    config_json, saved = _saved(model, tmp_path)
    if case == "vit":  # on disk, ViT keeps its checkpoint names (transformers 5 renames them when it loads)
        assert any(".attention.attention.query." in n for n in saved) and not any("q_proj" in n for n in saved)
    for source, forms in (("in memory", hf_forms(cfg, model.state_dict())), ("saved", hf_forms(config_json, saved))):
        by_key = {(f.stack, f.layer, f.head, f.kind): f for f in forms}
        want_keys = {(s["stack"], s["layer"], h, kind) for s in sites for h in range(-1, s["heads"])
                     for kind in ("qk", "ov")}
        assert set(by_key) == want_keys, f"{case} ({source})"
        for s in sites:
            H, where = s["heads"], f"{case} ({source}) {s['stack'] or 'stack'} layer {s['layer']}"
            x, q = cap.io[s["q"]]  # (Tq, d): the hidden state entering the attention, its queries
            y, k = cap.io[s["k"]]  # (Tk, d): the key side; y = x in self-attention
            y_v, v = cap.io[s["v"]]
            torch.testing.assert_close(y_v, y, rtol=0, atol=0)  # keys and values read the same hidden state
            if s["keys"] is not None:  # cross-attention: the keys read the encoder's output, not the decoder's state
                torch.testing.assert_close(y, s["keys"], rtol=0, atol=0)
                assert x.shape[0] != y.shape[0]
            else:
                torch.testing.assert_close(y, x, rtol=0, atol=0)
            logits = _heads(q, H) @ _heads(k, H).mT  # (H, Tq, Tk): the model's own q_h·k_h
            ov = _ov(model.get_submodule(s["o"]), _heads(v, H), H)  # (H, Tk, d)
            for h in range(-1, H):
                scores = x @ multiplied_out(by_key[(s["stack"], s["layer"], h, "qk")].form) @ y.mT
                want = logits.sum(0) if h < 0 else logits[h]
                torch.testing.assert_close(scores, want, rtol=1e-8, atol=1e-8 * want.abs().max().item(),
                                           msg=lambda m, w=f"{where} head {h} qk": f"{w}: {m}")
                written = y @ multiplied_out(by_key[(s["stack"], s["layer"], h, "ov")].form).mT
                want = ov.sum(0) if h < 0 else ov[h]
                torch.testing.assert_close(written, want, rtol=1e-8, atol=1e-8 * want.abs().max().item(),
                                           msg=lambda m, w=f"{where} head {h} ov": f"{w}: {m}")
            # the model's own attention probabilities, relative to key 0 of each query
            logp = s["probs"].log()  # (H, Tq, Tk)
            bias = torch.zeros_like(logp) if s["bias"] is None else s["bias"]
            mask = torch.ones(x.shape[0], y.shape[0], dtype=torch.bool)
            mask = torch.tril(mask) if s["causal"] else mask
            for h in range(H):
                scores = x @ multiplied_out(by_key[(s["stack"], s["layer"], h, "qk")].form) @ y.mT
                have = s["scale"] * (scores - scores[:, :1]) + (bias[h] - bias[h][:, :1])
                torch.testing.assert_close(have[mask], (logp[h] - logp[h][:, :1])[mask], rtol=0, atol=prob_atol,
                                           msg=lambda m, w=f"{where} head {h} probabilities": f"{w}: {m}")
            if s["keys"] is not None:  # negative control: the encoder's form of the same layer misses the cross logits
                scores = x @ multiplied_out(by_key[("encoder", s["layer"], 0, "qk")].form) @ y.mT
                assert (scores - logits[0]).abs().max() > 0.1 * logits[0].abs().max()


# ---- stack labels, numbering, prefixes ---------------------------------------------------------------------

STACKS = {  # case → (family, [(stack, heads, model width, head dim)] in the order they are read)
    "distilbert": ("distilbert", [("", 4, 16, 4)]),
    "vit": ("vit", [("", 4, 16, 4)]),
    "t5": ("t5", [("encoder", 3, 16, 5), ("decoder", 3, 16, 5), ("cross", 3, 16, 5)]),  # d_kv = 5, not 16 / 3
    "clip": ("clip", [("text", 4, 16, 4), ("vision", 3, 24, 8)]),
    "clip_text_model": ("clip", [("text", 4, 16, 4)]),
    "clip_vision_model": ("clip", [("vision", 3, 24, 8)]),
}


@pytest.mark.parametrize("case", list(STACKS))
def test_stack_labels_and_numbering(case):
    model, cfg = _build(case)
    family, stacks = STACKS[case]
    assert detect_architecture(cfg) == family
    forms = list(hf_forms(cfg, model.state_dict()))
    # stacks one after another, layers in order, per layer and kind the sum (head −1) then the heads
    assert [(f.stack, f.layer, f.head, f.kind) for f in forms] == [
        (stack, i, h, kind) for stack, H, _, _ in stacks for i in range(2) for kind in ("qk", "ov")
        for h in range(-1, H)]
    for stack, H, d, dh in stacks:
        of_stack = [f for f in forms if f.stack == stack]
        assert {f.variant for f in of_stack} == {"mha"} and {f.kv_cache_floats for f in of_stack} == {2 * H * dh}
        for f in of_stack:
            inner = H * dh if f.head < 0 else dh
            assert [tuple(t.shape) for t in f.form.factors] == [(d, inner), (inner, d)], (stack, f.key)
    layer_sums = list(hf_forms(cfg, model.state_dict(), heads=False, kinds=["ov"]))
    assert [(f.stack, f.layer, f.head, f.kind) for f in layer_sums] == [
        (stack, i, -1, "ov") for stack, _, _, _ in stacks for i in range(2)]


def _t5_state(model, prefix: str) -> dict:
    return {prefix + k: v for k, v in model.state_dict().items()}


def test_stacks_prefix_and_missing_stacks():
    transformers = _transformers()
    t5, cfg = _build("t5")
    n = len(list(hf_forms(cfg, t5.state_dict())))
    assert n == 3 * 2 * 2 * (3 + 1)  # stacks × layers × kinds × (heads + the layer sum)
    # prefix= is the model's prefix, before every stack's own path; found from the names when unique
    wrapped = _t5_state(t5, "wrap.")
    assert len(list(hf_forms(cfg, wrapped))) == n
    assert len(list(hf_forms(cfg, wrapped, prefix="wrap"))) == n
    with pytest.raises(CheckpointError, match=r"no t5 encoder stack under prefix ''"):
        list(hf_forms(cfg, wrapped, prefix=""))
    two_models = {**_t5_state(t5, "a."), **_t5_state(t5, "b.")}
    with pytest.raises(InputError, match="prefix"):
        list(hf_forms(cfg, two_models))
    assert {f.stack for f in hf_forms(cfg, two_models, prefix="b.")} == {"encoder", "decoder", "cross"}
    mixed = {k: v for k, v in two_models.items() if k.startswith("a.encoder.") or k.startswith("b.decoder.")}
    with pytest.raises(InputError, match="different prefixes"):
        list(hf_forms(cfg, mixed))
    # T5EncoderModel (model_type "t5") has no decoder: its encoder is read alone
    encoder_only = transformers.T5EncoderModel(transformers.T5Config(**T5_KW)).double()
    forms = list(hf_forms(encoder_only.config, encoder_only.state_dict()))
    assert {f.stack for f in forms} == {"encoder"} and len(forms) == n // 3
    # CLIP needs both towers, each with its sub-config
    clip, clip_cfg = _build("clip")
    text_only = {k: v for k, v in clip.state_dict().items() if not k.startswith("vision_model.")}
    with pytest.raises(CheckpointError, match="no clip vision stack"):
        list(hf_forms(clip_cfg, text_only))
    no_vision_config = {k: v for k, v in clip_cfg.to_dict().items() if k != "vision_config"}
    with pytest.raises(InputError, match="vision_config"):
        list(hf_forms(no_vision_config, clip.state_dict()))
    distil, distil_cfg = _build("distilbert")
    no_heads = {k: v for k, v in distil_cfg.to_dict().items() if k != "n_heads"}
    with pytest.raises(InputError, match="num_attention_heads"):
        list(hf_forms(no_heads, distil.state_dict()))


@pytest.mark.parametrize("case", ["t5", "clip"])
def test_analyze_rows_carry_the_stack(case):
    model, cfg = _build(case)
    df = rankscope.analyze(model, kinds=["qk", "ov"], fpr=0.1)
    forms = {(f.stack, f.layer, f.head, f.kind) for f in hf_forms(cfg, model.state_dict())}
    rows = list(zip(df["stack"], df["layer"], df["head_index"], df["kind"], strict=True))
    assert sorted(rows) == sorted(forms)  # one row per form, each with its stack
    assert df["name"].is_unique and all(n.startswith(s + " ") for n, s in zip(df["name"], df["stack"], strict=True))
    assert df.error.eq("").all()
