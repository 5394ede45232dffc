"""Lightning manual optimisation with LightningMTLOptimizer and mtl_step, on the real package."""

from __future__ import annotations

import pytest
import torch
from optional import require
from torch import nn

require("lightning")

import lightning as L  # noqa: E402

from mtlopt.integrations.lightning import (  # noqa: E402
    LightningMTLOptimizer,
    mtl_step,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


class TwoTasks(L.LightningModule):
    def __init__(self, strategy: str = "pcgrad") -> None:
        super().__init__()
        self.automatic_optimization = False
        self.strategy = strategy
        self.trunk = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16))
        self.a, self.b = nn.Linear(16, 1), nn.Linear(16, 1)
        self.infos = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.trunk(x)
        losses = {
            "a": ((self.a(h).squeeze(-1).float() - y[:, 0]) ** 2).mean(),
            "b": ((self.b(h).squeeze(-1).float() - 10 * y[:, 1]) ** 2).mean(),
        }
        self.infos.append(mtl_step(self, losses))
        self.lr_schedulers().step()

    def configure_optimizers(self):
        opt = LightningMTLOptimizer(
            torch.optim.Adam(self.parameters(), lr=1e-2), self.strategy, num_tasks=2
        )
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)]


def loader(n: int = 24):
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(n, 4, generator=g), torch.randn(n, 2, generator=g)
    )
    return torch.utils.data.DataLoader(data, batch_size=8)


def fit(module, steps, root, ckpt_path=None, batches=3, **options):
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=L.pytorch.loggers.CSVLogger(root),
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        default_root_dir=root,
        **options,
    )
    trainer.fit(module, loader(8 * batches), ckpt_path=ckpt_path)
    return trainer


def parameters(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


@pytest.mark.parametrize("strategy", ["ew", "pcgrad", "nash_mtl", "uw"])
def test_manual_optimisation_steps_counts_and_logs(strategy, tmp_path):
    torch.manual_seed(0)
    module = TwoTasks(strategy)
    before = parameters(module)
    trainer = fit(module, 4, tmp_path)
    assert trainer.global_step == 4 and len(module.infos) == 4
    assert not torch.equal(before, parameters(module))
    logged = trainer.logged_metrics
    assert {"mtl/loss/a", "mtl/loss/b"} <= set(logged)
    assert float(logged["mtl/loss/b"]) == pytest.approx(float(module.infos[-1].losses[1]))
    # StepLR halves the rate every 2 steps: the wrapped Adam sees it.
    assert module.optimizers().optimizer.optimizer.param_groups[0]["lr"] == pytest.approx(2.5e-3)


def test_lightning_checkpoint_resumes_the_strategy_state(tmp_path):
    # GradVac keeps a running target per task pair; the checkpoint written after step 3 must carry
    # it, with Adam's moments and the scheduler. One batch per epoch: where Lightning restarts
    # the data after a restore is its own business, not what this test is about.
    torch.manual_seed(0)
    straight = TwoTasks("gradvac")
    every_epoch = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{step}"
    )
    fit(straight, 6, tmp_path / "a", batches=1, callbacks=[every_epoch])
    torch.manual_seed(1)  # the checkpoint, not the seed, must decide what follows
    resumed = TwoTasks("gradvac")
    fit(resumed, 6, tmp_path / "b", ckpt_path=str(tmp_path / "ckpt" / "step=3.ckpt"), batches=1)
    assert len(resumed.infos) == 3
    torch.testing.assert_close(parameters(resumed), parameters(straight))
    target = straight.optimizers().optimizer.strategy.state_dict()
    assert target and str(resumed.optimizers().optimizer.strategy.state_dict()) == str(target)


def test_bf16_mixed_precision_on_cpu(tmp_path):
    torch.manual_seed(0)
    module = TwoTasks("mgda")
    fit(module, 3, tmp_path, precision="bf16-mixed")
    assert torch.isfinite(parameters(module)).all()
    assert all(p.dtype == torch.float32 for p in module.parameters())


def test_a_plain_mtloptimizer_gets_a_clear_error(tmp_path):
    import mtlopt

    class Plain(TwoTasks):
        def configure_optimizers(self):
            return mtlopt.MTLOptimizer(torch.optim.Adam(self.parameters()), "ew")

    with pytest.raises(TypeError, match="LightningMTLOptimizer"):
        fit(Plain(), 1, tmp_path)


class SometimesUnlabelled(TwoTasks):
    """Odd batches carry no label for task b: the step gets None for it."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.trunk(x)
        losses = {
            "a": ((self.a(h).squeeze(-1) - y[:, 0]) ** 2).mean(),
            "b": None if batch_idx % 2 else ((self.b(h).squeeze(-1) - y[:, 1]) ** 2).mean(),
        }
        self.infos.append(mtl_step(self, losses, log=False))


def test_a_task_missing_from_a_batch_trains_the_others(tmp_path):
    torch.manual_seed(0)
    module = SometimesUnlabelled("pcgrad")
    head_b = module.b.weight.detach().clone()
    fit(module, 2, tmp_path, batches=2)
    assert [info.present for info in module.infos] == [["a", "b"], ["a"]]
    assert not torch.equal(module.b.weight, head_b)  # trained on the first step only
