"""Forms: linear maps kept as products of their factors, never multiplied out (docs/design.md §1, §5).

A ``Chain`` is ``B = F1 @ F2 @ … @ Fk``. A ``Sum`` is ``B = L @ (C1 + … + C_C) @ R``: a sum of chains with
optional shared outer chains ``L`` and ``R``. A decoupled MLA head with compressed queries is such a sum,
``Wdqᵀ · (Wuqᵀ Wuk Wdkv + Wqrᵀ Wkr)``, with one ``Wdq`` on the left of both blocks: its null draws one ``Wdq``,
and its rank is at most ``min(dq, Σ bottlenecks)``. As in TransformerLens' ``FactoredMatrix``, ``@`` composes
and ``+`` sums, and nothing is densified.

Factors are 2-D ``(rows, cols)`` or 3-D ``(batch, rows, cols)`` tensors. A leading batch axis stacks the heads
of a layer (or the draws of a null); a 2-D factor in a batched form is the same for every batch item.
``stack`` makes one batched form of per-head forms: the factor positions a chain declares ``shared`` (the same
matrix for every head, e.g. MLA's ``Wdkv``) stay one 2-D factor — by declaration, not by object identity.

``Form.of`` is the one reader of the older spellings: a matrix, a list of factors, a list of lists of factors.
``Structure`` is a form's shape, all a null needs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from rankscope.errors import InputError

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------- structure


@dataclass(frozen=True)
class Structure:
    """The shape of a form: the dims ``(p, k1, …, q)`` of each chain of its sum and of its shared outer chains.

    A plain n×m matrix is ``Structure(((n, m),))``; an MHA head ``Structure(((d, dh, d),))``.
    """

    chains: tuple[tuple[int, ...], ...]
    left: tuple[int, ...] = ()  # (n, …, p) of the shared left chain; () for none
    right: tuple[int, ...] = ()  # (q, …, m) of the shared right chain; () for none

    @classmethod
    def of(cls, dims) -> Structure:
        """A Structure, or one from a sequence of chain dims ``[(n, k1, …, m), …]`` (a sum without shared parts)."""
        if isinstance(dims, Structure):
            return dims
        return cls(tuple(tuple(int(x) for x in d) for d in dims))

    @property
    def n(self) -> int:
        return self.left[0] if self.left else self.chains[0][0]

    @property
    def m(self) -> int:
        return self.right[-1] if self.right else self.chains[0][-1]

    @property
    def is_matrix(self) -> bool:
        """One factor, nothing else: the MP law applies."""
        return not self.left and not self.right and len(self.chains) == 1 and len(self.chains[0]) == 2

    @property
    def is_chain(self) -> bool:
        return not self.left and not self.right and len(self.chains) == 1

    @property
    def rank_bound(self) -> int:
        """The largest rank the form can have: min(n, m, the shared chains' widths, Σ_c narrowest dim of chain c)."""
        if self.is_matrix:
            return min(self.chains[0])
        return min(self.n, self.m, *self.left, *self.right, sum(min(d) for d in self.chains))

    def deflated(self, k: int) -> Structure:
        """The structure of what is left when k spikes are taken out: rank bound k less (the null of the k-th step of
        the sequential spike count, Kritchman & Nadler 2008).

        Every outer dimension, and every dimension of a shared outer chain, loses k (a spike takes one direction of
        each space it passes through). The inner dimensions of the chains of a sum lose their share of k, split in
        proportion to each chain's narrowest inner dimension (largest remainders first)."""
        if k == 0:
            return self
        if not 0 < k <= self.max_deflation:
            raise InputError(f"cannot deflate a form of rank {self.rank_bound} by {k} (at most "
                             f"{self.max_deflation})")
        if self.is_chain:
            return Structure((tuple(d - k for d in self.chains[0]),))
        widths = [min(d[1:-1]) if len(d) > 2 else 0 for d in self.chains]
        shares = _split(k, widths)
        chains = []
        for d, share in zip(self.chains, shares, strict=True):
            inner = tuple(x - share for x in d[1:-1])
            chains.append((d[0] - k, *inner, d[-1] - k))
        left = tuple(x - k for x in self.left)
        right = tuple(x - k for x in self.right)
        return Structure(tuple(chains), left, right)

    @property
    def max_deflation(self) -> int:
        """The largest k ``deflated`` can take: rank − 1, and for a sum as much as its blocks' inner widths allow
        (each keeps one inner dimension)."""
        if self.is_chain:
            return self.rank_bound - 1
        capacity = sum(max(min(d[1:-1]) - 1, 0) for d in self.chains if len(d) > 2)
        return min(self.rank_bound - 1, capacity)

    def as_dict(self) -> dict:
        return {"chains": [list(d) for d in self.chains], "left": list(self.left), "right": list(self.right)}

    def __str__(self) -> str:
        """``768·64·768`` for a chain, ``a + b`` for a sum, ``d·dq·(a + b)`` with a shared left chain."""
        inner = " + ".join("·".join(map(str, d)) for d in self.chains)
        if not self.left and not self.right:
            return inner
        left = "·".join(map(str, self.left[:-1])) + "·" if self.left else ""
        right = "·" + "·".join(map(str, self.right[1:])) if self.right else ""
        return f"{left}({inner}){right}"


def _split(k: int, widths: Sequence[int]) -> list[int]:
    """k split into integer shares proportional to ``widths`` (largest remainders first), each below its width."""
    total = sum(widths)
    if total <= 0:
        return [0] * len(widths)
    exact = [k * w / total for w in widths]
    shares = [min(int(e), max(w - 1, 0)) for e, w in zip(exact, widths, strict=True)]
    order = sorted(range(len(widths)), key=lambda i: exact[i] - int(exact[i]), reverse=True)
    while sum(shares) < k:
        progressed = False
        for i in order:
            if sum(shares) < k and shares[i] < widths[i] - 1:
                shares[i] += 1
                progressed = True
        if not progressed:
            break
    return shares


# ---------------------------------------------------------------------------------------------- forms


def _tensor(x) -> Tensor:
    """A factor as a tensor (numpy arrays are wrapped, model parameters read without their autograd graph)."""
    if not isinstance(x, torch.Tensor | np.ndarray):
        raise InputError(f"a factor must be a tensor or an array, got {type(x).__name__}")
    if isinstance(x, np.ndarray) and x.dtype.kind not in "biufc":  # object, string, datetime: not numbers
        raise InputError(f"a factor is a numpy array of dtype {x.dtype}, not of numbers; give a numeric array")
    if isinstance(x, torch.Tensor) and x.layout != torch.strided:
        raise InputError(f"a factor is a {x.layout} tensor; give a dense one (.to_dense())")
    try:
        t = torch.as_tensor(x).detach()
    except (TypeError, RuntimeError) as exc:  # e.g. numpy's float128, which torch has no dtype for
        raise InputError(f"a factor cannot be read as a tensor ({exc})") from None
    if t.ndim not in (2, 3):
        raise InputError(f"a factor has shape {tuple(t.shape)}; factors are 2-D (or 3-D with a leading batch axis)")
    return t


def _batch(tensors: Iterable[Tensor]) -> int | None:
    """The batch size of factors (3-D ones; size 1 broadcasts), None when all are 2-D."""
    sizes = {t.shape[0] for t in tensors if t.ndim == 3}
    if len(sizes - {1}) > 1:
        raise InputError(f"factors have different batch sizes {sorted(sizes)}")
    return max(sizes) if sizes else None


class Form:
    """A chain or a sum of chains. Immutable; ``.to()``/``.double()``/``.map()`` return new forms."""

    __slots__ = ()
    __array_ufunc__ = None  # ``array @ form``: numpy hands the product to ``__rmatmul__``
    chains: tuple[Chain, ...]
    left: Chain | None
    right: Chain | None

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is immutable")

    @staticmethod
    def of(x, name: str = "form") -> Form:
        """A Form from a Form, a matrix (tensor or array), a chain ``[F1, F2, …]`` or a sum ``[[A1, C1], [A2, C2]]``.

        Raises ``InputError`` naming ``name`` when ``x`` is none of these or its factors do not chain.
        """
        if isinstance(x, Form):
            return x
        try:
            if isinstance(x, torch.Tensor | np.ndarray):
                return Chain(x)
            if isinstance(x, Sequence) and len(x) > 0 and all(isinstance(f, torch.Tensor | np.ndarray) for f in x):
                return Chain(*x)
            if isinstance(x, Sequence) and len(x) > 0 and all(
                isinstance(c, Chain) or (isinstance(c, Sequence) and len(c) > 0
                                         and all(isinstance(f, torch.Tensor | np.ndarray) for f in c))
                for c in x
            ):
                return Sum([c if isinstance(c, Chain) else Chain(*c) for c in x])
        except InputError as exc:
            raise InputError(f"{name}: {exc}") from None
        raise InputError(
            f"{name}: expected a matrix, a chain [F1, F2, ...] or a sum of chains [[A1, C1], [A2, C2]] "
            f"of tensors or arrays, got {type(x).__name__}"
        )

    # ---- shape ------------------------------------------------------------------------------------------------
    @property
    def structure(self) -> Structure:
        return Structure(tuple(c.dims for c in self.chains), self.left.dims if self.left else (),
                         self.right.dims if self.right else ())

    @property
    def n(self) -> int:
        return self.structure.n

    @property
    def m(self) -> int:
        return self.structure.m

    @property
    def rank_bound(self) -> int:
        """The largest rank the form can have (its spectrum's length): see ``Structure.rank_bound``."""
        return self.structure.rank_bound

    @property
    def batch(self) -> int | None:
        """The batch size (heads, draws) of a batched form, None when every factor is 2-D."""
        return _batch(f for term in self.terms() for f in term)

    @property
    def factor_list(self) -> list[Tensor]:
        """Every factor once: the shared chains' factors, then each chain's."""
        return [f for c in (self.left, *self.chains, self.right) if c is not None for f in c.factors]

    def terms(self) -> list[tuple[Tensor, ...]]:
        """The form as a plain sum of products: one tuple of factors per chain, the shared outer factors included."""
        left = self.left.factors if self.left else ()
        right = self.right.factors if self.right else ()
        return [(*left, *c.factors, *right) for c in self.chains]

    # ---- conversion (``map`` is each subclass's own) ----------------------------------------------------------
    def to(self, *args, **kwargs) -> Form:
        """Every factor ``.to(*args, **kwargs)``; a shared factor stays one factor."""
        return self.map(lambda f: f.to(*args, **kwargs))

    def double(self) -> Form:
        return self.to(torch.float64)

    def __getitem__(self, i: int) -> Form:
        """Batch item ``i`` (e.g. one head) of a batched form; 2-D (shared) factors stay as they are, and a size-1
        batch axis broadcasts."""
        return self.map(lambda f: (f[i] if f.shape[0] > 1 else f[0]) if f.ndim == 3 else f)

    def __rmatmul__(self, other):
        """``tensor @ form``: the tensor becomes the form's first factor."""
        if isinstance(other, torch.Tensor | np.ndarray):
            return Chain(other) @ self
        return NotImplemented

    # ---- norms ------------------------------------------------------------------------------------------------
    def block_norms(self) -> Tensor:
        """Frobenius norm of each chain's term ``L C_c R``: (…, C) float64, via ‖XY‖_F² = Σ (XᵀX) ∘ (YYᵀ).

        Where a spectrum of this very form was asked to leave them (``kernels.spectrum(..., remember=True)``, from
        its Grams), the norms it left are read, once (``_memo``)."""
        memo = getattr(self, "_memo", None)
        if memo is not None:
            object.__setattr__(self, "_memo", None)
            return memo
        norms = []
        for term in self.terms():
            X, Y = split_at_bottleneck(reduced(Chain(*term)))
            X, Y = X.to(torch.float64), Y.to(torch.float64)
            gram = (X.mT @ X) * (Y @ Y.mT)  # (…, k, k)
            norms.append(gram.sum(dim=(-2, -1)).clamp_min(0).sqrt())
        return torch.stack(torch.broadcast_tensors(*norms), dim=-1)

    def __repr__(self) -> str:
        batch = "" if self.batch is None else f", batch {self.batch}"
        return f"{type(self).__name__}({self.structure}{batch})"


class Chain(Form):
    """``B = F1 @ F2 @ … @ Fk``. ``shared``: positions of factors that are the same for every head of a layer."""

    __slots__ = ("_memo", "factors", "shared")  # _memo: the block norms a spectrum left (kernels._remember)
    factors: tuple[Tensor, ...]
    shared: frozenset[int]

    def __init__(self, *factors, shared: Iterable[int] = ()):
        if len(factors) == 1 and isinstance(factors[0], list | tuple):
            factors = tuple(factors[0])
        fs = tuple(_tensor(f) for f in factors)
        if not fs:
            raise InputError("a chain needs at least one factor")
        for i in range(1, len(fs)):
            if fs[i - 1].shape[-1] != fs[i].shape[-2]:
                raise InputError(f"the chain does not multiply: factor {i - 1} has {fs[i - 1].shape[-1]} columns "
                                 f"but factor {i} has {fs[i].shape[-2]} rows")
        _batch(fs)
        positions = frozenset(int(i) for i in shared)
        if any(not 0 <= i < len(fs) for i in positions):
            raise InputError(f"shared factor positions {sorted(positions)} outside a chain of {len(fs)} factors")
        object.__setattr__(self, "factors", fs)
        object.__setattr__(self, "shared", positions)

    @property
    def chains(self) -> tuple[Chain, ...]:
        return (self,)

    @property
    def left(self) -> None:
        return None

    @property
    def right(self) -> None:
        return None

    @property
    def dims(self) -> tuple[int, ...]:
        """(n, k1, …, m): the outer and inner dimensions."""
        return (self.factors[0].shape[-2], *(f.shape[-1] for f in self.factors))

    def map(self, fn: Callable[[Tensor], Tensor]) -> Chain:
        return Chain(*(fn(f) for f in self.factors), shared=self.shared)

    def __matmul__(self, other):
        if isinstance(other, torch.Tensor | np.ndarray):
            other = Chain(other)
        if isinstance(other, Chain):
            return Chain(*self.factors, *other.factors,
                         shared={*self.shared, *(i + len(self.factors) for i in other.shared)})
        if isinstance(other, Sum):
            return Sum(other.chains, left=self if other.left is None else self @ other.left, right=other.right)
        return NotImplemented

    def __add__(self, other):
        return Sum([self]) + other


class Sum(Form):
    """``B = L @ (C1 + … + C_C) @ R``: chains of one shape, optional shared outer chains ``left`` and ``right``."""

    __slots__ = ("_memo", "chains", "left", "right")

    def __init__(self, chains: Sequence[Chain], left: Chain | None = None, right: Chain | None = None):
        chains = tuple(chains)
        if not chains or not all(isinstance(c, Chain) for c in chains):
            raise InputError("a sum needs one or more chains")
        p, q = chains[0].dims[0], chains[0].dims[-1]
        for c, chain in enumerate(chains):
            if (chain.dims[0], chain.dims[-1]) != (p, q):
                raise InputError(f"chain {c} is {chain.dims[0]}×{chain.dims[-1]} but chain 0 is {p}×{q}; "
                                 "the chains of a sum must have one shape")
        if left is not None and left.dims[-1] != p:
            raise InputError(f"the shared left chain has {left.dims[-1]} columns but the chains have {p} rows")
        if right is not None and right.dims[0] != q:
            raise InputError(f"the shared right chain has {right.dims[0]} rows but the chains have {q} columns")
        object.__setattr__(self, "chains", chains)
        object.__setattr__(self, "left", left)
        object.__setattr__(self, "right", right)
        _batch(f for c in (left, *chains, right) if c is not None for f in c.factors)

    def map(self, fn: Callable[[Tensor], Tensor]) -> Sum:
        return Sum([c.map(fn) for c in self.chains], left=self.left.map(fn) if self.left else None,
                   right=self.right.map(fn) if self.right else None)

    def __matmul__(self, other):
        if isinstance(other, torch.Tensor | np.ndarray):
            other = Chain(other)
        if isinstance(other, Chain):
            return Sum(self.chains, left=self.left, right=other if self.right is None else self.right @ other)
        if isinstance(other, Sum):
            raise InputError("a product of two sums is not a form rankscope reads; multiply out one of them")
        return NotImplemented

    def __add__(self, other):
        if isinstance(other, Chain):
            other = Sum([other])
        if not isinstance(other, Sum):
            return NotImplemented
        if self.left or self.right or other.left or other.right:
            raise InputError("a sum with shared outer factors takes no further terms; add inside the sum")
        return Sum([*self.chains, *other.chains])


# ---------------------------------------------------------------------------------------------- stacking


def stack(forms: Sequence[Form]) -> Form:
    """One batched form of per-head forms of one structure (e.g. the heads of a layer, for ``diagnose_batch``).

    Every factor is stacked along a new leading axis, except at the positions each chain declares ``shared``,
    where the first form's factor stays 2-D for all (no stacked copy of, say, DeepSeek-V3's 7168×1536 ``Wdq``).
    """
    forms = [Form.of(f) for f in forms]
    if not forms:
        raise InputError("stack: no forms given")
    first = forms[0]
    for f in forms:
        if type(f) is not type(first) or f.structure != first.structure:
            raise InputError(f"stack: forms of different structure ({f.structure} and {first.structure})")
        if f.batch is not None:
            raise InputError("stack: give unbatched per-head forms")

    def chains(get: Callable[[Form], Chain]) -> Chain:
        parts = [get(f) for f in forms]
        shared = parts[0].shared
        if any(p.shared != shared for p in parts):
            raise InputError("stack: the forms declare different shared factors")
        return Chain(*(parts[0].factors[i] if i in shared else torch.stack([p.factors[i] for p in parts])
                       for i in range(len(parts[0].factors))))

    if isinstance(first, Chain):
        return chains(lambda f: f)
    return Sum([chains(lambda f, c=c: f.chains[c]) for c in range(len(first.chains))],
               left=chains(lambda f: f.left) if first.left is not None else None,
               right=chains(lambda f: f.right) if first.right is not None else None)


# ---------------------------------------------------------------------------------------------- reductions


def product(factors: Sequence[Tensor]) -> Tensor:
    """F1 @ … @ Fk, left to right."""
    out = factors[0]
    for f in factors[1:]:
        out = out @ f
    return out


def split_at_bottleneck(chain: Chain) -> tuple[Tensor, Tensor]:
    """(X, Y) with chain = X @ Y and inner width the chain's narrowest inner dimension (a matrix: W = W @ I)."""
    if len(chain.factors) == 1:
        W = chain.factors[0]
        return W, torch.eye(W.shape[-1], dtype=W.dtype, device=W.device)
    dims = chain.dims
    j = 1 + int(np.argmin(dims[1:-1]))  # split after factor j − 1
    return product(chain.factors[:j]), product(chain.factors[j:])


def _triangular(F: Tensor, side: str) -> Tensor:
    """A tall F (left side) as the R of its QR, a wide F (right side) as Rᵀ of the QR of Fᵀ: the product it ends
    keeps its singular values (F X = Q (R X), X F = (X Rᵀ) Qᵀ) and its Frobenius norm."""
    if side == "left":
        return torch.linalg.qr(F, mode="r").R if F.shape[-2] > F.shape[-1] else F
    return torch.linalg.qr(F.mT, mode="r").R.mT if F.shape[-1] > F.shape[-2] else F


def reduced(form: Form) -> Form:
    """The same spectrum and block norms with smaller outer factors: the outermost factor of the form (of the
    shared left chain, or of a lone chain) replaced by its triangular factor when it is one matrix for the whole
    batch (2-D) and tall; likewise on the right. A shared ``Wdq`` is then factored once per layer, not per head."""

    def ends(chain: Chain, left: bool, right: bool) -> Chain:
        fs = list(chain.factors)
        if left and fs[0].ndim == 2:
            fs[0] = _triangular(fs[0], "left")
        if right and fs[-1].ndim == 2:
            fs[-1] = _triangular(fs[-1], "right")
        return Chain(*fs, shared=chain.shared)

    if isinstance(form, Chain):
        return form if len(form.factors) == 1 else ends(form, True, True)  # a lone matrix: nothing to gain
    return Sum(form.chains, left=ends(form.left, True, False) if form.left else None,
               right=ends(form.right, False, True) if form.right else None)
