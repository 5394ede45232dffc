import numpy as np
import pytest
import torch

import mtlopt


def test_first_step_uses_unit_weights_and_records_initial_losses():
    gn = mtlopt.create("gradnorm")
    jacobian = torch.tensor([[3.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    out = gn.aggregate(jacobian, torch.tensor([2.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(out, jacobian.sum(0))
    np.testing.assert_allclose(gn.initial_losses, [2.0, 4.0])


def test_weights_move_towards_balanced_gradient_norms():
    """Equal training rates: the task with the larger gradient norm loses weight (Eq. 2)."""
    gn = mtlopt.create("gradnorm", alpha=1.5, lr=0.01)
    jacobian = torch.tensor([[3.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    losses = torch.tensor([1.0, 1.0], dtype=torch.float64)
    for _ in range(50):
        gn.aggregate(jacobian, losses)
    assert gn.weights[0] < 1.0 < gn.weights[1]
    assert np.isclose(gn.weights.sum(), 2.0)
    # At the fixed point the weighted norms are equal: w_0·3 = w_1·1 with w_0 + w_1 = 2.
    for _ in range(2000):
        gn.aggregate(jacobian, losses)
    np.testing.assert_allclose(gn.weights, [0.5, 1.5], atol=0.05)


def test_slow_task_gains_weight():
    """Equal gradient norms, task 1's loss decreased less: its inverse training rate is larger."""
    gn = mtlopt.create("gradnorm", alpha=1.5)
    jacobian = torch.eye(2, dtype=torch.float64)
    gn.aggregate(jacobian, torch.tensor([1.0, 1.0], dtype=torch.float64))
    for _ in range(20):
        gn.aggregate(jacobian, torch.tensor([0.2, 0.9], dtype=torch.float64))
    assert gn.weights[1] > gn.weights[0]


def test_needs_losses():
    with pytest.raises(ValueError, match="losses"):
        mtlopt.create("gradnorm").aggregate(torch.eye(2))


def test_combine_does_not_change_state_until_commit():
    gn = mtlopt.create("gradnorm")
    jacobian, losses = torch.eye(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    gn.aggregate(jacobian, losses)
    before_weights, before_adam = gn.weights.copy(), gn._adam
    result = gn.combine(jacobian * torch.tensor([[5.0], [1.0]], dtype=torch.float64), losses)
    np.testing.assert_array_equal(gn.weights, before_weights)
    np.testing.assert_array_equal(gn._adam.m, before_adam.m)
    assert (gn._adam.t == 1).all()
    result.commit()
    assert not np.array_equal(gn.weights, before_weights)
    assert (gn._adam.t == 2).all()
