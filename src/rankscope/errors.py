"""Exceptions rankscope raises. Every message names the matrix or file and the problem."""


class RankscopeError(Exception):
    """Base class of every error rankscope raises on purpose."""


class InputError(RankscopeError, ValueError):
    """Bad input: a matrix with NaN/Inf, shapes that do not chain, an unknown option."""


class CheckpointError(RankscopeError):
    """A checkpoint or weights file that cannot be read: missing, truncated, corrupt or unsafe."""
