"""The training loop, its configuration and presets, and the diagnostics monitor.

The configuration (``rankscope.train.config``) needs no torch; the monitor and the loop are imported on first use."""

from rankscope.train.config import PRESETS, RunConfig, TrainConfig, resolve

__all__ = ["PRESETS", "Monitor", "RunConfig", "TrainConfig", "TrainResult", "resolve", "train"]


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


def __getattr__(name: str):
    if name == "Monitor":
        from rankscope.train.monitor import Monitor as found
    elif name in ("TrainResult", "train"):
        import rankscope.train.trainer as trainer

        found = getattr(trainer, name)
    else:
        raise AttributeError(f"module 'rankscope.train' has no attribute {name!r}")
    return found
