"""MTLTrainer with the real transformers Trainer: a tiny BERT (random weights, from a config) with
two task heads, trained on CPU."""

from __future__ import annotations

import pytest
import torch
from optional import fresh_accelerator_state, require  # noqa: F401
from torch import nn

require("transformers")
require("accelerate")

from token_models import TinyViT  # noqa: E402
from transformers import BertConfig, BertModel, TrainingArguments  # noqa: E402

import mtlopt  # noqa: E402
from mtlopt.integrations.hf import MTLTrainer  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning"),
    pytest.mark.usefixtures("fresh_accelerator_state"),  # accelerate's process-wide state
]


class TwoTaskBert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        config = BertConfig(
            vocab_size=40,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=16,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        self.encoder = BertModel(config)
        self.classify = nn.Linear(16, 3)
        self.regress = nn.Linear(16, 1)

    def forward(self, input_ids, label_class, label_value):
        h = self.encoder(input_ids=input_ids).last_hidden_state[:, 0]
        return {
            "losses": {
                "class": nn.functional.cross_entropy(self.classify(h), label_class),
                "value": nn.functional.mse_loss(self.regress(h).squeeze(-1), label_value),
            }
        }


class Rows(torch.utils.data.Dataset):
    def __init__(self, n: int = 32) -> None:
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, 40, (n, 8), generator=g)
        self.cls = torch.randint(0, 3, (n,), generator=g)
        self.val = 10 * torch.randn(n, generator=g)  # a loss scale unlike the classifier's

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "label_class": self.cls[i], "label_value": self.val[i]}


def args(out, **overrides) -> TrainingArguments:
    options = dict(
        output_dir=str(out),
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        max_steps=4,
        lr_scheduler_type="linear",
        warmup_steps=1,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        max_grad_norm=1.0,
        disable_tqdm=True,
    )
    return TrainingArguments(**{**options, **overrides})


def trained(out, strategy="pcgrad", model=None, **overrides):
    torch.manual_seed(0)
    model = model if model is not None else TwoTaskBert()
    trainer = MTLTrainer(
        model=model,
        args=args(out, **overrides),
        train_dataset=Rows(),
        strategy=strategy,
        mtl_options={"num_tasks": 2},  # UW and FAMO create their parameters from the task count
    )
    trainer.train()
    return trainer


def parameters(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("strategy", ["ew", "pcgrad", "gradvac", "nash_mtl", "uw", "famo"])
def test_every_kind_of_strategy_trains_through_the_trainer(strategy, tmp_path):
    torch.manual_seed(0)
    before = parameters(TwoTaskBert())
    trainer = trained(tmp_path, strategy)
    opt = trainer.mtl_optimizer
    assert opt.strategy.info.name == strategy
    assert opt.last_step is not None and opt.last_step.task_names == ["class", "value"]
    assert not torch.equal(before, parameters(trainer.model))
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and "mtl/loss/value" in logged[-1] and "mtl/loss/class" in logged[-1]


def test_the_trainers_scheduler_drives_the_wrapped_optimizer(tmp_path):
    trainer = trained(tmp_path, "pcgrad", max_steps=4, warmup_steps=0, learning_rate=1e-3)
    # Linear decay to zero over 4 steps: after step k the rate is 1e-3 · (4 - k) / 4.
    rates = [
        entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry
    ]
    assert rates[:3] == pytest.approx([1e-3, 7.5e-4, 5e-4])
    assert trainer.mtl_optimizer.optimizer.param_groups[0]["lr"] == 0.0  # the inner AdamW's


def test_gradient_accumulation_equals_the_full_batch(tmp_path):
    # PCGrad is not linear in the gradients: accumulation must combine the summed per-task
    # gradients once, as a batch of 8 would.
    whole = trained(tmp_path / "whole", "pcgrad", per_device_train_batch_size=8)
    micro = trained(
        tmp_path / "micro", "pcgrad", per_device_train_batch_size=4, gradient_accumulation_steps=2
    )
    torch.testing.assert_close(
        parameters(micro.model), parameters(whole.model), rtol=1e-4, atol=1e-5
    )


def test_a_resumed_run_continues_the_uninterrupted_one(tmp_path):
    # GradVac keeps a running target per task pair: it travels in the optimizer's checkpoint.
    straight = trained(tmp_path / "a", "gradvac", max_steps=6)
    trained(tmp_path / "b", "gradvac", max_steps=6, save_strategy="steps", save_steps=3)
    torch.manual_seed(0)
    resumed = MTLTrainer(
        model=TwoTaskBert(),
        args=args(tmp_path / "b", max_steps=6),
        train_dataset=Rows(),
        strategy="gradvac",
        mtl_options={"num_tasks": 2},
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))
    torch.testing.assert_close(parameters(resumed.model), parameters(straight.model))


def test_bf16_autocast_on_cpu(tmp_path):
    trainer = trained(tmp_path, "mgda", bf16=True)
    assert trainer.accelerator.mixed_precision == "bf16"
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert torch.isfinite(parameters(trainer.model)).all()


class TokenTasks(nn.Module):
    """A small transformer whose heads read their task's stream (DTME's contract)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyViT(tasks=2)
        self.blocks = self.net.blocks

    def forward(self, x, y):
        a, b = self.net(x)
        return {
            "losses": {
                "a": ((a.squeeze(-1) - y[:, 0]) ** 2).mean(),
                "b": ((b.squeeze(-1) - y[:, 1]) ** 2).mean(),
            }
        }


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 64) -> None:
        g = torch.Generator().manual_seed(2)
        self.x, self.y = torch.randn(n, 5, 3, generator=g), torch.randn(n, 2, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def test_dtme_expands_during_trainer_training(tmp_path):
    torch.manual_seed(0)
    model = TokenTasks()

    def dtme(m):
        return mtlopt.create(
            "dtme",
            blocks=m.blocks,
            num_tasks=2,
            model=m,
            base="pcgrad",
            analysis_steps=4,
            covariance_steps=2,
        )

    trainer = MTLTrainer(
        model=model, args=args(tmp_path, max_steps=7), train_dataset=Tokens(), strategy=dtme
    )
    trainer.train()
    strategy = trainer.mtl_optimizer.strategy
    assert strategy.phase == "expanded"
    # The modules DTME added train through the Trainer's optimizer too.
    added = {id(p) for group in strategy.task_parameters() for p in group}
    in_optimizer = {id(p) for g in trainer.mtl_optimizer.param_groups for p in g["params"]}
    assert added and added <= in_optimizer


def test_a_model_without_task_losses_gets_a_clear_error(tmp_path):
    class Plain(TwoTaskBert):
        def forward(self, input_ids, label_class, label_value):
            losses = super().forward(input_ids, label_class, label_value)["losses"]
            return {"loss": sum(losses.values())}

    with pytest.raises(TypeError, match="under 'losses'"):
        trained(tmp_path, "ew", model=Plain())


class SometimesUnlabelled(TwoTaskBert):
    """Rows without a value label (NaN) do not count for that task; a batch with none returns
    None for it."""

    def forward(self, input_ids, label_class, label_value):
        labelled = ~torch.isnan(label_value)
        out = super().forward(input_ids, label_class, label_value.nan_to_num())
        h = self.encoder(input_ids=input_ids).last_hidden_state[:, 0]
        value = self.regress(h).squeeze(-1)[labelled]
        out["losses"]["value"] = (
            nn.functional.mse_loss(value, label_value[labelled]) if labelled.any() else None
        )
        return out


class InOrder(MTLTrainer):
    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def test_a_task_missing_from_a_batch_trains_the_others(tmp_path):
    rows = Rows()
    rows.val[8:16] = float("nan")  # the second batch has no value labels at all
    torch.manual_seed(0)
    trainer = InOrder(
        model=SometimesUnlabelled(),
        args=args(tmp_path, max_steps=4),
        train_dataset=rows,
        strategy="pcgrad",
        mtl_options={"num_tasks": 2},
    )
    trainer.train()
    assert trainer.state.global_step == 4
    assert torch.isfinite(parameters(trainer.model)).all()
    assert trainer.mtl_optimizer.last_step.task_names == ["class", "value"]
