"""Token space: taps on a transformer's blocks, range/null-space conflict diagnostics, DTME-MTL."""

from . import dtme  # noqa: F401  (registers "dtme")
from .analysis import TokenSpaceAnalysis, analyze_token_conflicts
from .dtme import DTME
from .expansion import ExpansionPlan, TaskTokens, TokenModulation, expand
from .report import ConflictReport
from .space import ConflictCounts, CovarianceAccumulator, TokenSpace, split_rank
from .streams import stream_count, task_view
from .taps import TokenTaps, find_blocks, token_gradients

__all__ = [
    "DTME",
    "ConflictCounts",
    "ConflictReport",
    "CovarianceAccumulator",
    "ExpansionPlan",
    "TaskTokens",
    "TokenModulation",
    "TokenSpace",
    "TokenSpaceAnalysis",
    "TokenTaps",
    "analyze_token_conflicts",
    "expand",
    "find_blocks",
    "split_rank",
    "stream_count",
    "task_view",
    "token_gradients",
]
