"""The Accelerate loop with mtlopt.integrations.accelerate.backward, on the real package."""

from __future__ import annotations

import pytest
import torch
from optional import fresh_accelerator_state, require  # noqa: F401
from torch import nn

require("accelerate")

from accelerate import Accelerator  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402

import mtlopt  # noqa: E402
from mtlopt.integrations.accelerate import backward, unwrap  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning"),
    pytest.mark.usefixtures("fresh_accelerator_state"),  # accelerate's process-wide state
]


def setup(batch: int, accumulation: int = 1, strategy: str = "pcgrad", **options):
    set_seed(0)
    model = nn.ModuleDict(
        {
            "trunk": nn.Sequential(nn.Linear(4, 16), nn.Tanh()),
            "a": nn.Linear(16, 1),
            "b": nn.Linear(16, 1),
        }
    )
    opt = mtlopt.MTLOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), strategy)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(32, 4, generator=g), torch.randn(32, 2, generator=g)
    )
    loader = torch.utils.data.DataLoader(data, batch_size=batch)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation, **options)
    return accelerator, *accelerator.prepare(model, opt, loader, sched)


def losses(model, batch):
    x, y = batch
    h = model["trunk"](x)
    return {
        "a": ((model["a"](h).squeeze(-1).float() - y[:, 0]) ** 2).mean(),
        "b": ((model["b"](h).squeeze(-1).float() - 5 * y[:, 1]) ** 2).mean(),
    }


def train(accelerator, model, opt, loader, sched, epochs: int = 1):
    for _ in range(epochs):
        for batch in loader:
            with accelerator.accumulate(model):
                backward(accelerator, opt, losses(model, batch))
                opt.step()
                sched.step()
                opt.zero_grad()


def parameters(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_accumulation_over_prepared_objects_equals_the_full_batch():
    whole = setup(batch=16)
    train(*whole)
    micro = setup(batch=8, accumulation=2)
    train(*micro)
    torch.testing.assert_close(parameters(micro[1]), parameters(whole[1]), rtol=1e-5, atol=1e-6)
    assert unwrap(micro[2]).last_step.task_names == ["a", "b"]
    # The scheduler stepped once per optimizer step (2 of them), not per micro-batch.
    assert unwrap(micro[2]).param_groups[0]["lr"] == pytest.approx(1e-2 * 0.9**2)


def test_save_state_and_load_state_carry_the_strategy(tmp_path):
    straight = setup(batch=16, strategy="gradvac")
    train(*straight, epochs=2)
    first = setup(batch=16, strategy="gradvac")
    train(*first, epochs=1)
    first[0].save_state(tmp_path / "state")
    resumed = setup(batch=16, strategy="gradvac")
    with torch.no_grad():
        for p in resumed[1].parameters():
            p.add_(1.0)  # load_state must overwrite this
    resumed[0].load_state(tmp_path / "state")  # weights_only: the strategy state is tensors
    train(*resumed, epochs=1)
    torch.testing.assert_close(parameters(resumed[1]), parameters(straight[1]))


def test_bf16_autocast_on_cpu():
    accelerator, model, opt, loader, sched = setup(batch=16, mixed_precision="bf16")
    train(accelerator, model, opt, loader, sched)
    assert accelerator.mixed_precision == "bf16"
    assert torch.isfinite(parameters(model)).all()


def test_a_plain_optimizer_gets_a_clear_error():
    accelerator = Accelerator(cpu=True)
    with pytest.raises(TypeError, match="MTLOptimizer"):
        backward(accelerator, torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), [])


def test_a_task_missing_from_a_micro_batch_counts_where_present():
    accelerator, model, opt, loader, _ = setup(batch=8, accumulation=2)
    for i, batch in enumerate(loader):
        with accelerator.accumulate(model):
            task = losses(model, batch)
            if i % 2:
                task["b"] = None  # no labels for b in every second micro-batch
            backward(accelerator, opt, task)
            opt.step()
            opt.zero_grad()
    assert unwrap(opt).last_step.present == ["a", "b"]  # b present in one micro-batch of two
    assert torch.isfinite(parameters(model)).all()
