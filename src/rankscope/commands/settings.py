"""What ``train --help`` and ``study --help`` say about the presets and the ``--key value`` settings.

The settings are the fields of ``ModelConfig`` and ``TrainConfig``: each with its type, its default, the value each
preset gives it where that differs, and the comment beside the field in the source (the one place it is written).
Nothing here imports torch, so the help stays fast.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing

from rankscope.nn.config import ModelConfig
from rankscope.train.config import PRESETS, TrainConfig

PRESET_HELP = ("smoke (2 layers, 100 steps: a plumbing check, ~8 s a run) | cpu (8 layers, 600 steps: ~4 min a run "
               "on one core; the 30-run study ~55 min on 2 cores) | paper (GPT-2-small's shape, 20,000 steps: a GPU)")
_FIELD = re.compile(r"^\s{4}(\w+): [^=#]+(?:=[^#]*)?#\s*(.*)$")


def _comments(cls) -> dict[str, str]:
    """Field → the comment on its line in the class source ('' where it has none)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):  # no source (a frozen build): the help lists types and defaults only
        return {}
    return {m.group(1): m.group(2).strip() for m in map(_FIELD.match, source.splitlines()) if m}


def _type_name(hint) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args and type(None) in typing.get_args(hint):
        return f"{args[0].__name__} or none"
    return getattr(hint, "__name__", str(hint))


def settings_lines(cls) -> list[str]:
    """One line per field: ``--name type (= value)`` where every preset agrees, else ``(smoke v, cpu v, paper v)``,
    then the comment."""
    hints, notes = typing.get_type_hints(cls), _comments(cls)
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        values = {p: v.get(f.name, default) for p, v in PRESETS.items()}
        if len(set(map(repr, values.values()))) == 1:  # every preset the same: one value
            value = f"= {default!r}"
        else:
            value = ", ".join(f"{p} {v!r}" for p, v in values.items())
        line = f"--{f.name} {_type_name(hints[f.name])} ({value})"
        lines.append(line + (f": {notes[f.name]}" if notes.get(f.name) else ""))
    return lines


def settings_help() -> str:
    """The epilog of ``train`` and ``study``: every setting, model then training (typer keeps ``\\b`` blocks as
    written)."""
    def block(title: str, cls) -> str:
        return "\b\n" + title + "\n" + "\n".join("  " + line for line in settings_lines(cls))

    return (block("Model settings (--key value; `none` for an optional one):", ModelConfig) + "\n\n"
            + block("Training settings (--key value):", TrainConfig))


SETTINGS_HELP = settings_help()


def study_banner(preset: str, seeds: int, variants: str, sweep: str | None) -> str:
    """What ``rankscope study`` is about to do, and at what scale, printed before any work."""
    from rankscope.report.verdict import MIN_SCALE, MIN_SEEDS_TO_CONCLUDE

    values = PRESETS.get(preset, {})
    n = len([v for v in variants.split(",") if v.strip()])
    points = 1 if not sweep else 1 + sweep.count(",")
    layers, steps = values.get("n_layer", "?"), values.get("steps", "?")
    line = (f"Study of Jha & Reagen (2507.09394), preset {preset}: {n} variants × {seeds} seeds"
            + (f" × {points} sweep points" if points > 1 else "") + f" = {n * seeds * points} training runs of "
            f"{layers} layers, d={values.get('d_model', '?')}, {steps} steps, then the report.")
    small = (isinstance(layers, int) and layers < MIN_SCALE["n_layer"]) or (
        isinstance(steps, int) and steps < MIN_SCALE["steps"]) or seeds < MIN_SEEDS_TO_CONCLUDE
    if small:
        line += ("\nThis scale is a plumbing check: too small for its verdicts to say anything about the claims "
                 "(--preset cpu: 8 layers, 600 steps, 5 seeds, about an hour on 2 cores).")
    return line
