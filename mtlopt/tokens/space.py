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
    """Running uncentered token covariance per layer, in float64."""

    def __init__(self, num_layers: int) -> None:
        self.sums: list[Tensor | None] = [None] * num_layers
        self.samples = 0

    def add(self, tokens: Sequence[Tensor]) -> None:
        for d, x in enumerate(tokens):
            x = x.detach().double()
            outer = torch.einsum("bnp,bnq->pq", x, x).cpu()
            self.sums[d] = outer if self.sums[d] is None else self.sums[d] + outer
        self.samples += tokens[0].shape[0]

    def covariance(self, layer: int) -> np.ndarray:
        if self.samples == 0 or self.sums[layer] is None:
            raise RuntimeError("no tokens were observed: the covariance is undefined")
        return (self.sums[layer] / self.samples).numpy()


@dataclass
class ConflictCounts:
    """Per layer and task pair: tokens seen and tokens whose projected gradients conflict."""

    num_layers: int
    num_tasks: int
    range_conflicts: np.ndarray = field(init=False)
    null_conflicts: np.ndarray = field(init=False)
    tokens: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        shape = (self.num_layers, self.num_tasks, self.num_tasks)
        self.range_conflicts = np.zeros(shape)
        self.null_conflicts = np.zeros(shape)
        self.tokens = np.zeros(self.num_layers)

    def add(
        self, spaces: Sequence[TokenSpace], gradients: Sequence[Sequence[Tensor]], eps: float = 0.0
    ) -> None:
        """``gradients[i][d]``: task i's ``[B, N, p]`` gradient at layer d."""
        for d, space in enumerate(spaces):
            per_task = torch.stack([g[d] for g in gradients])  # [K, B, N, p]
            range_coords, null_coords = space.project(per_task)
            self.range_conflicts[d] += _pairwise_conflicts(range_coords, eps)
            self.null_conflicts[d] += _pairwise_conflicts(null_coords, eps)
            self.tokens[d] += per_task.shape[1] * per_task.shape[2]

    def rates(self) -> tuple[np.ndarray, np.ndarray]:
        """Conflict rates per layer (averaged over pairs) in the range and null space."""
        if not np.all(self.tokens > 0):
            raise RuntimeError("no token gradients were observed: conflict rates are undefined")
        pairs = np.triu_indices(self.num_tasks, k=1)
        denominator = self.tokens[:, None] * max(len(pairs[0]), 1)
        range_rate = self.range_conflicts[:, pairs[0], pairs[1]].sum(1) / denominator[:, 0]
        null_rate = self.null_conflicts[:, pairs[0], pairs[1]].sum(1) / denominator[:, 0]
        return range_rate, null_rate

    def pair_rates(self) -> tuple[np.ndarray, np.ndarray]:
        """``[D, K, K]`` conflict rates per layer and task pair (diagonal 0)."""
        scale = np.where(self.tokens > 0, self.tokens, 1.0)[:, None, None]
        return self.range_conflicts / scale, self.null_conflicts / scale


def _pairwise_conflicts(coordinates: Tensor, eps: float) -> np.ndarray:
    """``[K, K]`` counts of tokens with ``⟨a_i, a_j⟩ ≤ eps`` for ``[K, B, N, m]`` coordinates.

    An empty space (m = 0) has no conflicts: every inner product there is 0 by construction.
    """
    k = coordinates.shape[0]
    if coordinates.shape[-1] == 0:
        return np.zeros((k, k))
    flat = coordinates.reshape(k, -1, coordinates.shape[-1])
    dots = torch.einsum("itm,jtm->ijt", flat, flat)
    counts = (dots <= eps).sum(-1).double().cpu().numpy()
    np.fill_diagonal(counts, 0.0)
    return counts
