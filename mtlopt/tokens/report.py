"""The token-space conflict report: plain data, Markdown, and a heat map."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class ConflictReport:
    """Per-layer token-space statistics of a DTME analysis (or of a diagnostic run)."""

    range_rates: list[float]
    null_rates: list[float]
    range_ranks: list[int]
    dims: list[int]
    tokens_seen: list[float]
    pair_range_rates: list[list[list[float]]] = field(default_factory=list)
    pair_null_rates: list[list[list[float]]] = field(default_factory=list)
    modulation_layers: list[int] = field(default_factory=list)
    expansion_layers: list[int] = field(default_factory=list)
    parameters_added: int = 0
    parameters_before: int = 0
    predicted_multiplier: float = 1.0
    """Predicted block compute of the expanded model over the original (mtlopt.tokens.budget)."""

    @property
    def parameters_added_percent(self) -> float:
        return (
            100.0 * self.parameters_added / self.parameters_before
            if self.parameters_before
            else 0.0
        )

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["parameters_added_percent"] = self.parameters_added_percent
        return out

    def to_markdown(self) -> str:
        lines = [
            "| layer | range dim / p | range conflict | null conflict | modulation | task tokens |",
            "|---|---|---|---|---|---|",
        ]
        for d, (rr, nr) in enumerate(zip(self.range_rates, self.null_rates, strict=True)):
            lines.append(
                f"| {d} | {self.range_ranks[d]} / {self.dims[d]} | {rr:.3f} | {nr:.3f} | "
                f"{'yes' if d in self.modulation_layers else ''} | "
                f"{'yes' if d in self.expansion_layers else ''} |"
            )
        if self.parameters_before:
            lines.append("")
            lines.append(
                f"parameters added: {self.parameters_added} "
                f"({self.parameters_added_percent:.3f} % of {self.parameters_before})"
            )
        if self.modulation_layers or self.expansion_layers:
            lines.append(f"predicted block compute: {self.predicted_multiplier:.2f}× the model's")
        return "\n".join(lines)

    def plot(self, path: str | Path | None = None):
        """Heat map of the conflict rate by layer (rows) and space (columns); saved if ``path``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        data = np.array([self.range_rates, self.null_rates]).T
        fig, ax = plt.subplots(figsize=(3.6, 0.45 * len(self.range_rates) + 1.2))
        image = ax.imshow(
            data, cmap="magma", vmin=0.0, vmax=max(0.5, float(data.max())), aspect="auto"
        )
        ax.set_xticks([0, 1], ["range", "null"])
        ax.set_yticks(range(len(self.range_rates)))
        ax.set_ylabel("layer (block input)")
        for d in range(data.shape[0]):
            for s in range(2):
                mark = (
                    ("M" if d in self.modulation_layers else "")
                    if s == 0
                    else ("E" if d in self.expansion_layers else "")
                )
                ax.text(
                    s,
                    d,
                    f"{data[d, s]:.2f}{' ' + mark if mark else ''}",
                    ha="center",
                    va="center",
                    color="white" if data[d, s] < 0.35 else "black",
                    fontsize=8,
                )
        fig.colorbar(image, ax=ax, label="conflict rate")
        ax.set_title("token-space gradient conflicts")
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig
