import pytest
import torch

import mtlopt
from mtlopt.registry import Cost, Kind

FIRST_STRATEGIES = {"ew", "gradnorm", "mgda", "pcgrad", "cagrad"}


def test_first_strategies_are_registered_with_metadata():
    assert FIRST_STRATEGIES <= set(mtlopt.available())
    for name in mtlopt.available():
        info = mtlopt.info(name)
        assert info.name == name
        assert isinstance(info.kind, Kind) and isinstance(info.cost, Cost)
        assert isinstance(info.stateful, bool)
        assert info.paper, f"{name} must cite its paper"
        extra = {"blocks": [torch.nn.Identity()]} if info.kind is Kind.TOKEN else {}
        assert mtlopt.create(name, num_tasks=2, **extra).info is info


def test_the_field_is_covered_and_the_count_we_print_is_true():
    """Issue 18 asks for at least 45 names; README and the docs' home page quote the count."""
    from pathlib import Path

    count = len(mtlopt.available())
    assert count >= 45
    root = Path(__file__).resolve().parents[1]
    assert f"lists {count} strategies" in (root / "README.md").read_text()
    assert f"one string: {count} strategies" in (root / "docs" / "index.md").read_text()


def test_strategies_that_size_parameters_are_built_when_the_task_count_is_known():
    for name in ("uw", "imtl", "imtl_l"):
        lazy = mtlopt.create(name)
        assert lazy.parameters() == []
        lazy.build(3)
        assert len(lazy.parameters()) == 3
        assert len(mtlopt.create(name, num_tasks=2).parameters()) == 2


def test_create_passes_hyperparameters():
    strategy = mtlopt.create("cagrad", c=0.25, rescale=0)
    assert strategy.c == 0.25 and strategy.rescale == 0


def test_unknown_name_suggests_close_matches():
    with pytest.raises(KeyError, match="pcgrad"):
        mtlopt.create("pcgrd")


def test_bad_hyperparameter_is_rejected():
    with pytest.raises(ValueError, match="reduction"):
        mtlopt.create("pcgrad", reduction="median")
    with pytest.raises(TypeError):
        mtlopt.create("mgda", not_a_parameter=1)


def test_register_rejects_bad_names_and_duplicates():
    with pytest.raises(ValueError):
        mtlopt.register("PCGrad", kind="gradient", cost="T backward", stateful=False, paper="x")
    with pytest.raises(ValueError, match="already registered"):

        @mtlopt.register("pcgrad", kind="gradient", cost="T backward", stateful=False, paper="x")
        class Other(mtlopt.GramianStrategy):
            pass


def test_user_strategy_round_trip():
    import numpy as np

    @mtlopt.register(
        "test_first_task_only", kind="gradient", cost="T backward", stateful=False, paper="none"
    )
    class FirstOnly(mtlopt.GramianStrategy):
        def weigh(self, gramian, losses):
            w = np.zeros(gramian.shape[0])
            w[0] = 1.0
            return w, lambda: None

    import torch

    out = mtlopt.create("test_first_task_only").aggregate(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert out.tolist() == [1.0, 2.0]


def test_docs_catalogue_matches_the_registry():
    from pathlib import Path

    from mtlopt.catalogue import BEGIN, END, markdown_table

    text = (Path(__file__).resolve().parent.parent / "docs" / "strategies.md").read_text()
    committed = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert committed == markdown_table(), "run: python -m mtlopt.catalogue --write"


@pytest.mark.parametrize("kind", ["loss", "gradient", "token", "hooks", "structural"])
def test_docs_family_pages_match_the_registry(kind):
    from pathlib import Path

    from mtlopt.catalogue import family_page

    page = Path(__file__).resolve().parent.parent / "docs" / f"family-{kind}.md"
    assert page.read_text() == family_page(kind), "run: python -m mtlopt.catalogue --write"
