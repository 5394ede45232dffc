"""The two-objective toy of CAGrad, Nash-MTL and FAMO (anchors.md §10.1), scale s = 0.1."""

from __future__ import annotations

import torch

from .problem import Instance, Problem

STARTS = [(-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0)]
SCALE = 0.1
EPS = 5e-6
PARETO_TOLERANCE = 0.5
LOWER = (-21 * SCALE, -21.0)
"""Lower bounds of L1 and L2 (FAMO's ``min_losses`` here; the validation signal's zero)."""


def toy_losses(x: torch.Tensor, scale: float = SCALE) -> list[torch.Tensor]:
    """L1 = s·(a·h1 + b·q1), L2 = a·h2 + b·q2 (the code of all three repositories)."""
    x1, x2 = x[0], x[1]
    h1 = torch.log(torch.clamp((0.5 * (-x1 - 7) - torch.tanh(-x2)).abs(), min=EPS)) + 6
    h2 = torch.log(torch.clamp((0.5 * (-x1 + 3) + torch.tanh(-x2) + 2).abs(), min=EPS)) + 6
    q1 = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    q2 = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    a = torch.clamp(torch.tanh(x2 / 2), min=0)
    b = torch.clamp(torch.tanh(-x2 / 2), min=0)
    return [scale * (a * h1 + b * q1), a * h2 + b * q2]


class Point(torch.nn.Module):
    def __init__(self, start: tuple[float, float]) -> None:
        super().__init__()
        self.x = torch.nn.Parameter(torch.tensor(start, dtype=torch.float64))
        self.rep = torch.nn.Identity()  # the "representation" is the point itself (Rep-MTL)


def pareto_distance(x: torch.Tensor) -> float:
    """Distance from x to the toy's Pareto set, the segment x1 ∈ [−7, 7], x2 = −8 between the minima
    of q1 (7, −8) and q2 (−7, −8): in the region x2 < 0 the losses are b·q with b = tanh(−x2/2) ≈ 1,
    and no point with x2 ≥ 0 reaches those values (the log terms are bounded below by about −6).
    The segment is exact up to b(−8) = tanh(4) = 0.9993."""
    x1, x2 = float(x[0]), float(x[1])
    return (max(abs(x1) - 7.0, 0.0) ** 2 + (x2 + 8.0) ** 2) ** 0.5


def setup(seed: int, start: int, quick: bool) -> Instance:
    model = Point(STARTS[start])

    def evaluate(m: Point) -> dict[str, float]:
        with torch.no_grad():
            l1, l2 = (float(v) for v in toy_losses(m.x))
        distance = pareto_distance(m.x.detach())
        return {
            "L1": l1,
            "L2": l2,
            "distance": distance,
            "pareto": float(distance <= PARETO_TOLERANCE),
        }

    return Instance(
        model=model,
        batch=lambda step: None,
        losses=lambda m, _: toy_losses(m.rep(m.x)),
        evaluate=evaluate,
        lr=1e-2 if quick else 1e-3,
        trace=lambda m: [float(v) for v in m.x.detach()],
        # Deterministic: the training losses themselves, as gaps above lower bounds of the two
        # losses (those FAMO uses), since CoBa and PIVRG compare them in ratios.
        validation=lambda m, _: [v - b for v, b in zip(toy_losses(m.x), LOWER, strict=True)],
        representation=model.rep,
    )


PROBLEM = Problem(
    name="toy",
    description="two-objective toy (CAGrad/Nash-MTL/FAMO), s = 0.1, Adam; full: lr 1e-3, 35k steps "
    "(Nash-MTL's protocol); quick: lr 1e-2, 2k steps",
    tasks=["L1", "L2"],
    metrics={"L1": True, "L2": True, "distance": True, "pareto": False},
    metric_task={},
    setup=setup,
    steps=35000,
    quick_steps=2000,
    quick_methods=["ew", "mgda", "pcgrad", "cagrad", "nash_mtl", "famo"],
    variants=list(range(len(STARTS))),
    quick_variants=[0, 2, 4],
    single_task_baselines=False,
    excluded={
        "gls": "needs positive losses (the toy's are negative)",
        "db_mtl": "takes log-losses (the toy's are negative)",
        "gradnorm": "its inverse training rate L_i(t)/L_i(0) needs non-negative losses (the toy's "
        "are negative)",
        "dtme": "no transformer",
        "recon": "no layers to branch (the toy's only parameter is the point)",
        "imtl_l": "e^s L − s is unbounded below for L < 0",
        "imtl": "e^s L − s is unbounded below for L < 0",
        "igb": "takes log-losses (the toy's are negative)",
        "go4align": "its scales Σ_j L_j / L_i need positive losses (the toy's are negative)",
        "ldc_mtl": "its ratios L_i / min_j L_j need positive losses (the toy's are negative)",
    },
    method_kwargs={
        "famo": {"min_losses": list(LOWER), "gamma": 0.0},
        "cagrad": {"c": 0.5},
        "pbi": {"reference": [-21 * SCALE, -21.0]},
    },
    notes="`distance`: from the final point to the Pareto set (the segment x1 ∈ [−7, 7], "
    "x2 = −8); `pareto` = 1 when it is within 0.5. "
    "Variants "
    "are the starting points (−8.5, 7.5), (0, 0), (9, 9), (−7.5, −0.5), (9, −1).",
)
