"""PCGrad: projecting conflicting gradients."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np

from ..registry import register
from ..solvers import matmul
from .base import Commit, GramianStrategy, Randomized


@register(
    "pcgrad",
    kind="gradient",
    cost="T backward",
    stateful=True,
    paper="Yu et al., Gradient Surgery for Multi-Task Learning, NeurIPS 2020",
    conventions="reduction='sum' (Algorithm 1 of the paper; torchjd, LibMTL, Nash-MTL code); "
    "'mean' matches Pytorch-PCGrad; random task order per task and step, seedable; each task "
    "visits the others only, as Algorithm 1: the three reference implementations (LibMTL, "
    "Nash-MTL's code, Pytorch-PCGrad) also visit the task's own original gradient, projecting "
    "g_i^PC off g_i when they conflict (self_projection=True; up to 6 % apart)",
)
class PCGrad(Randomized, GramianStrategy):
    """PCGrad (Yu et al., 2020, Algorithm 1).

    For every task i, in a random order of the other tasks j, whenever ``g_i^PC · g_j < 0`` project
    ``g_i^PC ← g_i^PC − (g_i^PC · g_j / ‖g_j‖²) g_j``; the update is ``Σ_i g_i^PC``.

    Every projected gradient stays in the span of the task gradients, so the projection runs on the
    coefficients ``c_i`` (``g_i^PC = c_iᵀ J``) using only the Gramian: O(T²) scalar work instead of
    O(T² P) vector work.

    Args:
        reduction: ``"sum"`` (paper, default) or ``"mean"`` of the projected gradients.
        seed: seed of the strategy's own generator (saved in ``state_dict``); ``None`` draws one
            from torch's global generator.
        self_projection: also visit task i's own original gradient, at a random place in its
            order, as the reference implementations do (default False: Algorithm 1 visits
            ``j ≠ i``). After projections ``g_i^PC · g_i`` can turn negative, and is then
            projected too.
    """

    absent_tasks = (
        "each present task is projected against the other present tasks, in random order"
    )

    _state_attrs = ("_rng_state",)

    def __init__(
        self,
        reduction: Literal["sum", "mean"] = "sum",
        seed: int | None = None,
        self_projection: bool = False,
        num_tasks: int | None = None,
    ):
        super().__init__(num_tasks)
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.reduction = reduction
        self.self_projection = self_projection
        self._init_rng(seed)

    def hyperparameters(self) -> dict[str, object]:
        return {"reduction": self.reduction, "self_projection": self.self_projection}

    def weigh(self, gramian: np.ndarray, losses: np.ndarray | None) -> tuple[np.ndarray, Commit]:
        rng, commit = self._step_rng()
        t = gramian.shape[0]
        if self.self_projection:
            orders = [rng.permutation(t) for _ in range(t)]
        else:
            orders = [rng.permutation(np.delete(np.arange(t), i)) for i in range(t)]
        weights = project_conflicting(gramian, orders).sum(axis=0)
        if self.reduction == "mean":
            weights /= t
        return weights, commit


def project_conflicting(
    gramian: np.ndarray, orders: list[np.ndarray], block: int | None = None
) -> np.ndarray:
    """PCGrad's projected gradients as coefficients: row i holds ``c_i`` with ``g_i^PC = c_iᵀ J``.

    ``orders[i]`` is the order in which task i is projected against the other tasks (it may
    contain i itself: then ``g_i^PC`` is projected off the original ``g_i`` when they conflict).
    Every task's projections are independent of the others', so the T sequences advance together
    (:func:`advance_together`), round k pairing task i with ``orders[i][k]``.
    """
    squared_norms = np.diag(gramian)

    def project(partners: np.ndarray, present: np.ndarray, dots: np.ndarray) -> np.ndarray:
        norms = squared_norms[partners]
        conflicting = present & (dots < 0.0) & (norms > 0.0)
        return np.where(conflicting, -dots / np.where(norms > 0.0, norms, 1.0), 0.0)

    return advance_together(gramian, orders, project, block)


Step = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def advance_together(
    gramian: np.ndarray, orders: list[np.ndarray], step: Step, block: int | None = None
) -> np.ndarray:
    """Coefficients ``C`` (``g_i' = c_iᵀ J``, from ``C = I``) after T sequences of updates
    ``c_i ← c_i + s e_p``, task i meeting ``p = orders[i][k]`` at round k with
    ``s = step(partners, present, dots)[i]``, where ``dots_i = ⟨g_i', g_p⟩ = (C G)_ip`` before the
    update (``present``: whether task i's sequence has a k-th entry; the step must be 0 where not).

    Only the entries of ``C G`` that a round reads are formed: the rounds run in blocks of ``b``;
    at the start of a block one product ``C G`` gives them as of then, and within the block each
    row adds the earlier steps' contributions ``Σ s_k' G_{p_k', p_k}`` from the b × b Gramian of
    its own partners. That is ``L/b`` matrix products and ``T L b`` scalar work for sequences of
    length L (``b ≈ 2√T``), against the ``T L`` row updates of length T of one round at a time.
    """
    t = gramian.shape[0]
    length = max((len(order) for order in orders), default=0)
    # int32 indices where they fit: the gathers below read them as fast as they read G.
    index_type = np.int32 if t * t < 2**31 else np.int64
    partners = np.tile(np.arange(t, dtype=index_type)[:, None], (1, length))
    present = np.zeros((t, length), dtype=bool)
    for i, order in enumerate(orders):
        partners[i, : len(order)] = order
        present[i, : len(order)] = True
    block = max(8, int(2 * np.sqrt(t))) if block is None else block
    coefficients = np.eye(t)
    rows = np.arange(t)[:, None]
    for start in range(0, length, block):
        mine = partners[:, start : start + block]
        products = gramian if start == 0 else matmul(coefficients, gramian)
        base = products[rows, mine]
        # Row i's G[p_k', p_k] for its partners p in this block, k' < k, by k then k'.
        later, earlier = np.tril_indices(mine.shape[1], -1)
        flat = mine[:, earlier] * index_type(t)
        flat += mine[:, later]
        among = np.take(gramian, flat)  # flat (C-order) indices into G
        steps = np.zeros(mine.shape)
        for k in range(mine.shape[1]):
            offset = k * (k - 1) // 2
            dots = base[:, k] + np.einsum("ij,ij->i", steps[:, :k], among[:, offset : offset + k])
            steps[:, k] = step(mine[:, k], present[:, start + k], dots)
        np.add.at(coefficients, (np.broadcast_to(rows, mine.shape), mine), steps)
    return coefficients
