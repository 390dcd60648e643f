"""A form multiplied out by plain matmuls: the independent reference the kernel and probe tests compare against."""

import torch


def multiplied_out(form) -> torch.Tensor:
    """Σ over the form's terms of F1 @ F2 @ … in float64; a tuple or list of factors is one term."""
    terms = form.terms() if hasattr(form, "terms") else [form]
    total = 0
    for term in terms:
        out = term[0].double()
        for f in term[1:]:
            out = out @ f.double()
        total = total + out
    return total


def save_tiny_gpt2(path, n_layer: int):
    """A GPT-2 of width 32 (4 heads), random init with seed 0, saved with ``save_pretrained`` (safetensors and
    config.json): a small real checkpoint for the analyze tests. Returns ``path``."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=n_layer, n_head=4, vocab_size=64, n_positions=16)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    return path
