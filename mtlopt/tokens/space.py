"""Token space: range and null space of the token covariance, and gradient conflicts in each.

DTME-MTL (Jeong & Yoon, ICCV 2025), Sec. 3.2 and Appendix B.3: per layer, the uncentered covariance
``C = (1/n) Σ_l T_l T_lᵀ`` of the block's input tokens is eigendecomposed; the leading eigenvectors
``U_R`` span the range space, the rest ``U_N`` the null space. Task gradients with respect to each
token are projected onto both spaces and a pair of tasks conflicts at a token when the projected
inner product is ``≤ 0``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor

SplitRule = Literal["ratio", "absolute"]


def split_rank(eigenvalues: np.ndarray, r: float = 100.0, rule: SplitRule = "ratio") -> int:
    """Number m of range-space directions for eigenvalues sorted in descending order.

    ``"ratio"`` (our reading of the paper's Eq. 3, see the DTME docs): the smallest m with
    ``Σ_{i≤m} λ_i ≥ r · Σ_{i>m} λ_i``, i.e. the range space holds a fraction r/(1+r) of the
    energy (99 % for r = 100). ``"absolute"``: the literal reading, the smallest m whose
    cumulative eigenvalue sum reaches r.
    """
    lam = np.clip(np.asarray(eigenvalues, dtype=np.float64), 0.0, None)
    cumulative = np.cumsum(lam)
    total = cumulative[-1] if lam.size else 0.0
    if total <= 0:
        return 0
    if rule == "ratio":
        ok = cumulative >= r * (total - cumulative)
    elif rule == "absolute":
        ok = cumulative >= r
    else:
        raise ValueError(f"rule must be 'ratio' or 'absolute', got {rule!r}")
    return int(np.argmax(ok)) + 1 if ok.any() else lam.size


@dataclass
class TokenSpace:
    """One layer's eigenbasis split into range (``basis[:, :rank]``) and null space."""

    eigenvalues: np.ndarray
    basis: np.ndarray
    rank: int

    @classmethod
    def from_covariance(
        cls, covariance: np.ndarray, r: float = 100.0, rule: SplitRule = "ratio"
    ) -> TokenSpace:
        lam, vectors = np.linalg.eigh(np.asarray(covariance, dtype=np.float64))
        order = np.argsort(lam)[::-1]
        lam, vectors = lam[order], vectors[:, order]
        return cls(lam, vectors, split_rank(lam, r, rule))

    @property
    def range_basis(self) -> np.ndarray:
        return self.basis[:, : self.rank]

    @property
    def null_basis(self) -> np.ndarray:
        return self.basis[:, self.rank :]

    def project(self, gradients: Tensor) -> tuple[Tensor, Tensor]:
        """Coordinates of ``[..., p]`` gradients in the range and null space (``U_Rᵀ g``, ``U_Nᵀ g``).

        Inner products of the coordinates equal those of the projections ``U Uᵀ g``.
        """
        basis = torch.from_numpy(self.basis).to(gradients.device)
        coordinates = gradients.double() @ basis
        return coordinates[..., : self.rank], coordinates[..., self.rank :]


class CovarianceAccumulator:
    """Running uncentered token covariance per layer (App. B.3: ``C = (1/n) Σ_l T_l T_lᵀ``), in
    float64, over real tokens only (padding excluded where a mask says which tokens are real)."""

    def __init__(self, num_layers: int) -> None:
        self.sums: list[Tensor | None] = [None] * num_layers
        self.samples = 0

    def increments(
        self, tokens: Sequence[Tensor], real: Sequence[Tensor | None] | None = None
    ) -> list[Tensor]:
        """The ``p × p`` sums this batch adds, one per layer (not yet added)."""
        out = []
        for d, x in enumerate(tokens):
            x = x.detach().double()
            keep = None if real is None else real[d]
            if keep is not None:
                x = x * keep.to(x.device, x.dtype)[..., None]
            out.append(torch.einsum("bnp,bnq->pq", x, x).cpu())
        return out

    def add_increments(self, increments: Sequence[Tensor], samples: int) -> None:
        for d, outer in enumerate(increments):
            self.sums[d] = outer if self.sums[d] is None else self.sums[d] + outer
        self.samples += samples

    def add(self, tokens: Sequence[Tensor], real: Sequence[Tensor | None] | None = None) -> None:
        self.add_increments(self.increments(tokens, real), tokens[0].shape[0])

    def covariance(self, layer: int) -> np.ndarray:
        if self.samples == 0 or self.sums[layer] is None:
            raise RuntimeError("no tokens were observed: the covariance is undefined")
        return (self.sums[layer] / self.samples).numpy()


@dataclass
class ConflictCounts:
    """Per layer and task pair: real tokens seen, and per space the (token, pair) triples counted
    and those whose projected gradients conflict (Sec. 3.2: ``⟨U Uᵀ g_i, U Uᵀ g_j⟩ ≤ 0``).

    One rule for every space: a pair is counted at a token in a space when both tasks' projected
    gradients there are non-zero. An empty space (m = 0) and a token no task's loss reaches (zero
    gradients) therefore count nothing, instead of reading as conflicts (0 ≤ 0); padding tokens are
    excluded by the block's mask where it has one.
    """

    num_layers: int
    num_tasks: int
    range_conflicts: np.ndarray = field(init=False)
    null_conflicts: np.ndarray = field(init=False)
    range_pairs: np.ndarray = field(init=False)
    null_pairs: np.ndarray = field(init=False)
    tokens: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        shape = (self.num_layers, self.num_tasks, self.num_tasks)
        self.range_conflicts = np.zeros(shape)
        self.null_conflicts = np.zeros(shape)
        self.range_pairs = np.zeros(shape)
        self.null_pairs = np.zeros(shape)
        self.tokens = np.zeros(self.num_layers)

    def increments(
        self,
        spaces: Sequence[TokenSpace],
        gradients: Sequence[Sequence[Tensor]],
        eps: float = 0.0,
        real: Sequence[Tensor | None] | None = None,
    ) -> dict[str, np.ndarray]:
        """What one batch adds (``gradients[i][d]``: task i's ``[B, N, p]`` gradient at layer d),
        not yet added: :meth:`add_increments` commits it."""
        shape = (self.num_layers, self.num_tasks, self.num_tasks)
        out = {name: np.zeros(shape) for name in _COUNTS}
        out["tokens"] = np.zeros(self.num_layers)
        for d, space in enumerate(spaces):
            per_task = torch.stack([g[d] for g in gradients])  # [K, B, N, p]
            flat = per_task.reshape(per_task.shape[0], -1, per_task.shape[-1])
            keep = None if real is None else real[d]
            if keep is None:
                keep = (flat != 0).any(-1).any(0)  # tokens some task's loss reaches
            else:
                keep = keep.reshape(-1).to(flat.device)
            flat = flat[:, keep]
            range_coords, null_coords = space.project(flat)
            for name, coords in (("range", range_coords), ("null", null_coords)):
                conflicts, pairs = _pairwise_conflicts(coords, eps)
                out[f"{name}_conflicts"][d] = conflicts
                out[f"{name}_pairs"][d] = pairs
            out["tokens"][d] = flat.shape[1]
        return out

    def add_increments(self, increments: dict[str, np.ndarray]) -> None:
        for name, value in increments.items():
            setattr(self, name, getattr(self, name) + value)

    def add(
        self,
        spaces: Sequence[TokenSpace],
        gradients: Sequence[Sequence[Tensor]],
        eps: float = 0.0,
        real: Sequence[Tensor | None] | None = None,
    ) -> None:
        self.add_increments(self.increments(spaces, gradients, eps, real))

    def rates(self) -> tuple[np.ndarray, np.ndarray]:
        """Conflict rates per layer (conflicts over counted pairs, all pairs together) in the range
        and null space; 0 where nothing was counted (an empty space)."""
        if not np.all(self.tokens > 0):
            raise RuntimeError("no token gradients were observed: conflict rates are undefined")
        pairs = np.triu_indices(self.num_tasks, k=1)
        out = []
        for conflicts, counted in (
            (self.range_conflicts, self.range_pairs),
            (self.null_conflicts, self.null_pairs),
        ):
            c = conflicts[:, pairs[0], pairs[1]].sum(1)
            n = counted[:, pairs[0], pairs[1]].sum(1)
            out.append(np.where(n > 0, c / np.where(n > 0, n, 1.0), 0.0))
        return out[0], out[1]

    def pair_rates(self) -> tuple[np.ndarray, np.ndarray]:
        """``[D, K, K]`` conflict rates per layer and task pair (diagonal 0)."""
        return (
            self.range_conflicts / np.where(self.range_pairs > 0, self.range_pairs, 1.0),
            self.null_conflicts / np.where(self.null_pairs > 0, self.null_pairs, 1.0),
        )


_COUNTS = ("range_conflicts", "null_conflicts", "range_pairs", "null_pairs")


def _pairwise_conflicts(coordinates: Tensor, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """``[K, K]`` counts, for ``[K, T, m]`` coordinates, of the tokens where both tasks' coordinates
    are non-zero (counted) and of those among them with ``⟨a_i, a_j⟩ ≤ eps`` (conflicts)."""
    k = coordinates.shape[0]
    if coordinates.shape[-1] == 0 or coordinates.shape[1] == 0:
        return np.zeros((k, k)), np.zeros((k, k))
    nonzero = (coordinates != 0).any(-1).double()  # [K, T]
    dots = torch.einsum("itm,jtm->ijt", coordinates, coordinates)
    conflicts = torch.einsum("ijt,it,jt->ij", (dots <= eps).double(), nonzero, nonzero)
    pairs = nonzero @ nonzero.T
    conflicts, pairs = conflicts.cpu().numpy(), pairs.cpu().numpy()
    np.fill_diagonal(conflicts, 0.0)
    np.fill_diagonal(pairs, 0.0)
    return conflicts, pairs
