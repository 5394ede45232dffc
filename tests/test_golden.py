"""Published reference outputs on J = [[-4, 1, 1], [6, 1, 1]] (torchjd's test suite, atol 1e-4).

See ../shared/reference/anchors.md §2.6. Conventions: torchjd's PCGrad is the sum of the projected
gradients (ours by default); torchjd's CAGrad does not rescale (ours needs rescale=0).
"""

import pytest
import torch

import mtlopt

J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])


@pytest.mark.parametrize(
    "name, kwargs, expected",
    [
        ("ew", {}, [2.0, 2.0, 2.0]),
        ("ew", {"reduction": "mean"}, [1.0, 1.0, 1.0]),
        ("mgda", {}, [0.0, 1.0, 1.0]),
        ("pcgrad", {"seed": 0}, [0.5848, 3.8012, 3.8012]),
        ("pcgrad", {"seed": 123}, [0.5848, 3.8012, 3.8012]),  # order cannot matter for T = 2
        ("cagrad", {"c": 0.5, "rescale": 0}, [0.1835, 1.2041, 1.2041]),
    ],
)
def test_golden_value(name, kwargs, expected):
    out = mtlopt.create(name, **kwargs).aggregate(J)
    torch.testing.assert_close(out, torch.tensor(expected), atol=1e-4, rtol=0)


def test_mgda_weights_golden():
    """torchjd's MGDA weighting on G = J Jᵀ: [0.6, 0.4]."""
    result = mtlopt.create("mgda").combine(J)
    torch.testing.assert_close(result.weights, torch.tensor([0.6, 0.4]), atol=1e-4, rtol=0)


def test_pcgrad_weights_golden():
    """torchjd's PCGrad weighting: [2.2222, 1.5789]."""
    result = mtlopt.create("pcgrad", seed=0).combine(J)
    torch.testing.assert_close(result.weights, torch.tensor([2.2222, 1.5789]), atol=1e-4, rtol=0)
