"""Exceptions rankscope raises. Every message names the matrix or file and the problem."""


class RankscopeError(Exception):
    """Base class of every error rankscope raises on purpose."""


class InputError(RankscopeError, ValueError):
    """Bad input: a matrix with NaN/Inf, shapes that do not chain, an unknown option."""


class UndefinedMeasure(InputError):
    """A measure that does not exist on these (valid) inputs: coincident class means make CDNV, GNC2 or NC1
    infinite or 0/0. A bundle of measures records it as NaN; asked for alone, it is an input error."""


class CheckpointError(RankscopeError):
    """A checkpoint or weights file that cannot be read: missing, truncated, corrupt or unsafe."""


def one_line(err: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an error's text, shortened: a library's message inside ours, without its
    traceback noise."""
    line = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
    return line if len(line) <= limit else line[: limit - 1] + "…"
