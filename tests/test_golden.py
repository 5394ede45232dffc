"""Published reference outputs on J = [[-4, 1, 1], [6, 1, 1]] (torchjd's test suite, atol 1e-4).

See ../shared/reference/anchors.md §2.6. Convention differences, each checked here:
- PCGrad and GradVac: torchjd sums the projected gradients, as we do by default.
- CAGrad: torchjd does not rescale; ours needs ``rescale=0`` (our default rescales by 1/(1+c²)).
- Aligned-MTL: torchjd averages the aligned gradients (our default ``reduction="mean"``); LibMTL sums,
  which doubles the output for two tasks.
- UPGrad / DualProj: torchjd normalises G by its trace and adds a 1e-4 ridge (our default
  ``reg_eps=1e-4``); the exact projection (``reg_eps=0``) differs in the fourth decimal.
- Nash-MTL: torchjd clips the output to norm 1 as the authors' code (our default ``max_norm=1``).
"""

import pytest
import torch

import mtlopt

J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])

CASES = [
    ("ew", {}, [2.0, 2.0, 2.0], [1.0, 1.0]),
    ("ew", {"reduction": "mean"}, [1.0, 1.0, 1.0], [0.5, 0.5]),
    ("mgda", {}, [0.0, 1.0, 1.0], [0.6, 0.4]),
    ("pcgrad", {"seed": 0}, [0.5848, 3.8012, 3.8012], [2.2222, 1.5789]),
    ("pcgrad", {"seed": 123}, [0.5848, 3.8012, 3.8012], [2.2222, 1.5789]),
    ("gradvac", {"seed": 0}, [0.5848, 3.8012, 3.8012], [2.2222, 1.5789]),
    ("imtl_g", {}, [0.0767, 1.0, 1.0], [0.5923, 0.4077]),
    ("aligned_mtl", {}, [0.2133, 0.9673, 0.9673], [0.5591, 0.4083]),
    ("upgrad", {}, [0.2929, 1.9004, 1.9004], [1.1109, 0.7894]),
    ("dualproj", {}, [0.5563, 1.1109, 1.1109], [0.6109, 0.5]),
    ("cagrad", {"c": 0.5, "rescale": 0}, [0.1835, 1.2041, 1.2041], [0.7041, 0.5]),
    ("fairgrad", {"alpha": 1.0}, [0.0766, 0.9985, 0.9985], [0.5915, 0.4071]),
    ("nash_mtl", {}, [0.0542, 0.7061, 0.7061], None),
    ("config", {}, [0.1588, 2.0706, 2.0706], None),
]


@pytest.mark.parametrize("name, kwargs, expected, weights", CASES)
def test_golden_value(name, kwargs, expected, weights):
    strategy = mtlopt.create(name, **kwargs)
    result = strategy.combine(J)
    torch.testing.assert_close(result.direction, torch.tensor(expected), atol=1e-4, rtol=0)
    if weights is not None:
        torch.testing.assert_close(result.weights, torch.tensor(weights), atol=1e-4, rtol=0)
    torch.testing.assert_close(mtlopt.create(name, **kwargs).aggregate(J), result.direction)


def test_convention_switches_move_away_from_the_anchor_as_documented():
    torch.testing.assert_close(
        mtlopt.create("aligned_mtl", reduction="sum").aggregate(J),
        2 * mtlopt.create("aligned_mtl").aggregate(J),
    )
    exact = mtlopt.create("upgrad", reg_eps=0.0).aggregate(J)
    assert abs(float(exact[0]) - 0.2929) > 1e-4  # the anchor needs torchjd's ridge
    torch.testing.assert_close(exact, torch.tensor([0.2924, 1.9006, 1.9006]), atol=1e-4, rtol=0)
    unclipped = mtlopt.create("nash_mtl", max_norm=None).aggregate(J)
    torch.testing.assert_close(
        unclipped / unclipped.norm(), torch.tensor([0.0542, 0.7061, 0.7061]), atol=1e-4, rtol=0
    )
