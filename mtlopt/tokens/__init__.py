"""Token space: taps on a transformer's blocks, range/null-space conflict diagnostics, DTME-MTL."""

from . import dtme, recon  # noqa: F401  (registers "dtme" and "recon")
from .analysis import TokenSpaceAnalysis, analyze_token_conflicts
from .budget import choose_layers, predicted_multiplier
from .deploy import load_expanded, plan_from_state_dict
from .dtme import DTME
from .expansion import ExpansionPlan, TaskTokens, TokenGate, TokenModulation, expand
from .plan import PlanStability, TokenPlan, plan_expansion
from .report import ConflictReport
from .space import ConflictCounts, CovarianceAccumulator, TokenSpace, split_rank
from .streams import is_streamed, single_task, stream_count, task_view
from .taps import TokenTaps, find_blocks, token_gradients

__all__ = [
    "DTME",
    "ConflictCounts",
    "ConflictReport",
    "CovarianceAccumulator",
    "ExpansionPlan",
    "PlanStability",
    "TaskTokens",
    "TokenGate",
    "TokenModulation",
    "TokenPlan",
    "TokenSpace",
    "TokenSpaceAnalysis",
    "TokenTaps",
    "analyze_token_conflicts",
    "choose_layers",
    "expand",
    "find_blocks",
    "is_streamed",
    "load_expanded",
    "plan_expansion",
    "plan_from_state_dict",
    "predicted_multiplier",
    "single_task",
    "split_rank",
    "stream_count",
    "task_view",
    "token_gradients",
]
