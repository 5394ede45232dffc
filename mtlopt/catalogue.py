"""The strategy catalogue as a Markdown table, generated from the registry's metadata.

python -m mtlopt.catalogue            # print the table
python -m mtlopt.catalogue --write    # refresh it in docs/strategies.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .registry import _lookup, available, info

BEGIN, END = "<!-- catalogue:begin -->", "<!-- catalogue:end -->"


def markdown_table() -> str:
    lines = [
        "| name | kind | cost | stateful | paper | conventions and defaults | a task absent from a step |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in available():
        if not _lookup(name).__module__.startswith("mtlopt."):
            continue  # strategies registered by users are not part of the catalogue
        row = info(name).as_row()
        cost = row["cost"] + (f"; needs {row['hooks']}" if row["hooks"] else "")
        lines.append(
            f"| `{name}` | {row['kind']} | {cost} | {row['stateful']} | {row['paper']} | "
            f"{row['conventions']} | {_lookup(name).absent_tasks} |"
        )
    return "\n".join(lines)


FAMILIES = {
    "loss": (
        "Loss weighting",
        "Loss strategies turn the vector of task losses into one objective; one backward pass per "
        "step. Heads receive the gradient of that objective, as in the papers.",
    ),
    "gradient": (
        "Gradient methods",
        "Gradient strategies combine the T×P matrix J of per-task gradients of the shared "
        "parameters (one `autograd.grad` per task); heads receive their own task's gradient "
        "untouched. Most weights depend only on the Gramian J Jᵀ.",
    ),
    "token": (
        "Token space",
        "Token strategies work on a transformer's token activations and leave the combination of "
        "the losses to a base strategy.",
    ),
    "hooks": (
        "Methods that need a hook",
        "These strategies need more than the step's task losses, and the optimizer gets it through "
        "one of three hooks (`mtlopt.hooks`); a step without it is refused with an error that says "
        "what to pass, before anything changes.\n\n"
        "* **Multi-batch closure** (`modo`, `sdmgrad`): `opt.step(closure)` calls the closure once "
        "per independent batch (three by default, `batches=2` for the two-batch form), so **each "
        "call must draw a new batch**; or pass the draws, `opt.step([losses_1, losses_2, "
        "losses_3])`. The last draw is back-propagated as usual (its gradients reach the heads); "
        "the others give the extra Jacobians the weights are updated from (with `batches=2`, MoDo "
        "steps along the mean of both draws).\n"
        "* **Perturb and re-evaluate** (`fmtl`, `samo`): `opt.step(closure)` evaluates the "
        "closure, takes each task's gradient, moves the parameters the task reaches by its "
        "sharpness-aware perturbation (shared part and head part each of norm ρ), re-evaluates the "
        "closure there (**the same batch at every call**), and restores every parameter bit for "
        "bit, together with the running statistics of the BatchNorm layers the re-evaluations ran "
        "through. The SAM gradients are then combined by any gradient strategy: "
        "`mtlopt.create(\"fmtl\", base=\"upgrad\")` is \"SAM + UPGrad\" in one line.\n"
        "* **Validation signal** (`coba`, `pivrg`): `opt.observe(validation_losses=...)` or "
        "`opt.observe(scores=...)` records one value per task in the strategy's state (saved by "
        "`state_dict`, restored by `load_state_dict`); a function instead of a value is called "
        "before every step.\n\n"
        "Not supported yet with these strategies: a `GradScaler`, `torch.distributed`, gradient "
        "accumulation over several `backward` calls (an error says so).",
    ),
    # i18c: structural methods -----------------------------------------------------------------
    "structural": (
        "Structural methods",
        "These methods change the structure of the training step rather than only the weighting: "
        "a bilevel virtual step on a validation batch (`auto_lambda`: pass the `model` and a "
        "`validation` closure, and step with a closure; `moml`, the multi-objective form of that "
        "upper level: the `model` and a `validation` closure giving every task a loss; `forum`, "
        "its first-order value-function form: the same, and step with a closure), a "
        "regulariser on the feature gradients "
        "∂L_t/∂z back-propagated through the heads (`rep_mtl`: pass the `representation` module), "
        "task weights from the per-sample gradients ∂ℓ/∂z (`ntkmtl_sr`: the same `representation`), "
        "an α-fair shared update with a consistency term on the heads from ∂ℓ_t/∂z (`consmtl`: the "
        "same `representation`), "
        "a mask on the combined update of any gradient strategy (`sparse_mtl`: `base=`, "
        "`density=` or `mask=`), and a change of the model's sharing after an analysis "
        "(`recon`: pass the candidate `layers`; heads read their stream with "
        "`mtlopt.task_view`, as after DTME). Stepped without what it needs, each method raises "
        "an error that says what to pass, before anything changes.",
    ),
}


def family_page(kind: str) -> str:
    """The docs page of one family: every built-in strategy's docstring, rendered by mkdocstrings."""
    title, intro = FAMILIES[kind]
    lines = [
        f"# {title}",
        "",
        intro,
        "",
        "Each section is the strategy's docstring: the paper, the equation it implements and its "
        "hyperparameters with their defaults. Conventions chosen where references disagree are in "
        "the [catalogue](strategies.md). Generated by `python -m mtlopt.catalogue --write`.",
        "",
    ]
    for name in available():
        cls = _lookup(name)
        kind_of = info(name).kind.value
        family = "hooks" if info(name).hooks and kind_of != "structural" else kind_of
        if family != kind or not cls.__module__.startswith("mtlopt."):
            continue
        lines += [
            f"## `{name}`",
            "",
            f"::: {cls.__module__}.{cls.__qualname__}",
            "    options:",
            "      show_root_heading: false",
            "      members: false",
            "",
        ]
    return "\n".join(lines)


def refresh(path: Path) -> bool:
    """Rewrite the table between the markers of ``path``; True if the file changed."""
    text = path.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{markdown_table()}\n{END}{tail}"
    if new != text:
        path.write_text(new)
        return True
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description="The strategy catalogue from the registry")
    parser.add_argument("--write", action="store_true", help="refresh docs/strategies.md")
    args = parser.parse_args()
    if args.write:
        docs = Path(__file__).resolve().parent.parent / "docs"
        refresh(docs / "strategies.md")
        for kind in FAMILIES:
            (docs / f"family-{kind}.md").write_text(family_page(kind))
    else:
        print(markdown_table())


if __name__ == "__main__":
    main()
