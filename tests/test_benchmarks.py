"""Smoke runs of every benchmark problem (tiny budgets), caching, and failure handling."""

from __future__ import annotations

import csv
import json
import os

import pytest

from mtlopt_bench import __main__ as cli
from mtlopt_bench import data, suite

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _require(problem: str) -> None:
    try:
        if problem in ("multifashion", "vit_finetune"):
            data.fashion_mnist("test")
        elif problem == "qm9":
            data._qm9_files()
    except data.DataMissing as missing:
        if os.environ.get("MTLOPT_REQUIRE_DATA"):  # CI installs the data: these must run there
            raise
        pytest.skip(str(missing))


@pytest.mark.parametrize(
    "problem, methods",
    [
        ("toy", "ew,pcgrad,famo"),
        ("scaling", "ew,mgda"),
        ("multifashion", "ew,dtme"),
        ("qm9", "ew,pcgrad"),
        ("vit_finetune", "ew,dtme"),
    ],
)
def test_smoke_run_writes_every_output(problem, methods, tmp_path, capsys):
    _require(problem)
    assert (
        cli.main(
            [
                "run",
                problem,
                "--quick",
                "--methods",
                methods,
                "--steps",
                "3",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    folder = tmp_path / problem
    for name in ("results.json", "results.csv", "results.md", "curves.png"):
        assert (folder / name).stat().st_size > 0, name
    header = " ".join(  # many metrics are split over several tables
        line
        for line in (folder / "results.md").read_text().splitlines()
        if line.startswith("| variant | method |")
    )
    for column in ("method", "time / EW", "step (ms)", "peak memory (MB)", "seeds"):
        assert column in header
    definition = cli.PROBLEMS[problem]
    for metric in definition.metrics:
        assert metric in header
    if definition.single_task_baselines:
        assert "Δm %" in header and "lower is better" in (folder / "results.md").read_text()
    rows = json.loads((folder / "results.json").read_text())["rows"]
    assert {r["method"] for r in rows} == set(methods.split(","))
    assert all("error" not in r for r in rows), rows
    assert "Smoke run" in (folder / "results.md").read_text()  # --quick
    with open(folder / "results.csv") as f:
        assert len(list(csv.reader(f))) == len(rows) + 1
    if problem == "toy":
        assert (folder / "trajectories.png").exists() and (folder / "pareto.png").exists()
    if problem == "scaling":
        assert (folder / "cost_vs_tasks.png").exists()


def test_finished_runs_are_reused_and_new_methods_added(tmp_path, monkeypatch):
    calls = []
    real = suite.execute

    def counting(spec, problem, out):
        calls.append(spec.method)
        return real(spec, problem, out)

    monkeypatch.setattr(cli, "execute", counting)
    args = ["run", "toy", "--quick", "--steps", "3", "--out", str(tmp_path)]
    cli.main([*args, "--methods", "ew,mgda"])
    first = len(calls)
    cli.main([*args, "--methods", "ew,mgda,pcgrad"])
    assert calls[first:] == ["pcgrad"] * (len(calls) - first) and len(calls) - first == 3
    cli.main([*args, "--methods", "ew,mgda", "--steps", "4"])  # another budget: not the same runs
    assert len(calls) > first + 3


def test_a_failing_method_is_recorded_and_the_suite_goes_on(tmp_path, monkeypatch):
    monkeypatch.setitem(cli.PROBLEMS["toy"].method_kwargs, "cagrad", {"c": -1.0})  # invalid
    cli.main(
        ["run", "toy", "--quick", "--methods", "ew,cagrad", "--steps", "3", "--out", str(tmp_path)]
    )
    rows = json.loads((tmp_path / "toy" / "results.json").read_text())["rows"]
    failed = [r for r in rows if r["method"] == "cagrad"]
    assert failed and all("c must be non-negative" in r["error"] for r in failed)
    assert all("error" not in r for r in rows if r["method"] == "ew")


def test_missing_data_gives_the_install_command(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(data, "FASHION_DIR", tmp_path / "nowhere")
    with pytest.raises(data.DataMissing, match="apt-get install dataset-fashion-mnist"):
        data.fashion_mnist("train")
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(data.DataMissing, match="pip install qm9pack"):
        data.qm9()


def test_list(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("toy", "qm9", "multifashion", "scaling", "dtme", "pcgrad"))


def test_toy_pareto_set_and_the_ridge_where_averaging_stalls():
    import torch

    from mtlopt_bench.toy import STARTS, pareto_distance, toy_losses

    assert pareto_distance(torch.tensor([0.0, -8.0])) == 0
    assert pareto_distance(torch.tensor([9.0, -8.0])) == pytest.approx(2.0)
    # Both task minima lie on the set, and nothing with x2 > 0 does better on both tasks.
    for minimum in ([7.0, -8.0], [-7.0, -8.0]):
        assert pareto_distance(torch.tensor(minimum)) == 0
    grid = torch.cartesian_prod(torch.linspace(-10, 10, 81), torch.linspace(0.01, 10, 41)).double()
    on_set = toy_losses(torch.tensor([0.0, -8.0], dtype=torch.float64))
    above = [toy_losses(p) for p in grid]
    assert not any(
        float(a[0]) <= float(on_set[0]) and float(a[1]) <= float(on_set[1]) for a in above
    )
    # Plain averaging (EW) from (9, -1) oscillates on the ridge x2 ≈ 0, far from the set.
    x = torch.tensor(STARTS[4], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([x], lr=1e-2)
    for _ in range(2000):
        opt.zero_grad()
        sum(toy_losses(x)).backward()
        opt.step()
    assert abs(float(x[1])) < 0.1 and pareto_distance(x.detach()) > 5


def test_with_libmtl_adds_libmtl_rows_trained_on_the_same_batches(tmp_path, capsys):
    from mtlopt_bench import libmtl_peer

    if not libmtl_peer.available():
        if os.environ.get("MTLOPT_REQUIRE_LIBMTL"):
            raise AssertionError("LibMTL is required in CI")
        pytest.skip("LibMTL 1.1.5 is not installed")
    argv = ["run", "scaling", "--quick", "--methods", "ew,mgda,cagrad", "--with-libmtl"]
    assert cli.main([*argv, "--steps", "3", "--out", str(tmp_path)]) == 0
    rows = {
        (r["variant"], r["method"]): r
        for r in json.loads((tmp_path / "scaling" / "results.json").read_text())["rows"]
    }
    for variant in ("2", "10"):
        for method in ("ew", "mgda"):  # same model, batches and method: the same result
            ours, theirs = rows[variant, method], rows[variant, f"libmtl:{method}"]
            assert theirs["mean MSE"][0] == pytest.approx(ours["mean MSE"][0], rel=1e-3)
        # LibMTL 1.1.5's CAGrad hard-codes three tasks: the failure is a row, not a crash.
        assert "cannot reshape" in rows[variant, "libmtl:cagrad"]["error"]


def test_perf_tables_cover_every_gradient_strategy_and_mark_missed_targets():
    from mtlopt_bench import perf

    lines, medians, own = perf.floor_table(
        [("qm9", 2)], rounds=2, warmup=0, progress=lambda m: None
    )
    table = "\n".join(lines)
    assert own[-1].startswith("| qm9 T=2 |")
    # The wrapper's own work excludes the backward passes: a small fraction of the floor's step.
    floor_ms, typical_ms = (float(cell) for cell in own[-1].split("|")[2:4])
    assert 0 < typical_ms < floor_ms / 2
    for name in perf.gradient_methods():
        assert f"| {name} |" in table
    assert set(medians["qm9", 2]) == {"floor", *perf.gradient_methods()}
    assert perf._mark(1.2, 1.1) == "**1.20**" and perf._mark(1.05, 1.1) == "1.05"
    modes = "\n".join(perf.modes_table([("multifashion", 2)], 1, 0, lambda m: None))
    assert "dtme, after expansion" in modes and "mgda, representation mode" in modes
    assert perf.ANALYSIS_OVER_FLOOR in modes


def test_perf_peer_table_pairs_each_method_with_libmtl_and_libmtl_with_its_floor():
    from mtlopt_bench import libmtl_peer, perf

    if not libmtl_peer.available():
        pytest.skip("LibMTL 1.1.5 is not installed")
    lines = perf.peer_table([("qm9", 2)], rounds=1, warmup=0, progress=lambda m: None)
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in lines[2:]}
    assert set(rows) == set(libmtl_peer.LIBMTL_METHODS)
    for method, (ours_over_libmtl, libmtl_over_floor) in rows.items():
        if method in ("graddrop", "cagrad"):  # LibMTL cannot run these here: the reason is shown
            assert "LibMTL fails" in ours_over_libmtl and libmtl_over_floor.strip() == "–"
        else:
            assert float(ours_over_libmtl.strip(" *")) > 0
            assert float(libmtl_over_floor) > 0


def test_perf_allocator_table_runs_both_configurations_in_subprocesses():
    from mtlopt_bench import allocator

    assert isinstance(allocator.pin(), bool)
    lines = allocator.table("qm9", 2, "ew", repeats=1, rounds=1, progress=lambda m: None)
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in lines[2:]}
    assert set(rows) == {"default (adaptive)", "pinned", "pinned / default, same pair of processes"}
    for label in ("default (adaptive)", "pinned"):
        floor_ms, ratio = (float(cell) for cell in rows[label])
        assert floor_ms > 0 and ratio > 0


def test_plot_styles_tell_two_hundred_methods_apart():
    """24 strategies once drew aligned_mtl and rlw (the 1st and 21st) as the same blue circle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mtlopt_bench.report import _style

    styles = {(_style(n, plt)["color"], _style(n, plt)["marker"]) for n in range(200)}
    assert len(styles) == 200


def test_perf_small_and_solver_sections_run_and_replace_their_part_of_the_page():
    from mtlopt_bench import perf, perf_small, perf_solvers

    gradient, loss, tiny = perf_small.small_tables([2], 1, 0, lambda m: None, ["mgda", "ew"])
    assert gradient[3].startswith("| mgda |") and loss[3].startswith("| ew |")
    assert [line.split(" |")[0] for line in tiny[3:]] == ["| mgda", "| ew"]
    solvers = perf_solvers.solver_scaling_table([4, 400], 1e-9, lambda m: None)
    assert len(solvers) == 2 + len(perf_solvers.gramian_methods())
    assert all("T³ extrapolation" in line for line in solvers[2:])  # the cap stops every row
    page = "# P\n\n## A\n\nold\n\n## B\n\nkept\n"
    replaced = perf.replace_section(page, "## A", "## A\n\nnew\n")
    assert replaced == "# P\n\n## A\n\nnew\n\n## B\n\nkept\n"
    assert perf.replace_section(page, "## C", "## C\n\nx\n").endswith("kept\n\n## C\n\nx\n")


def test_perf_gramian_engine_and_memory_sections(monkeypatch):
    from mtlopt_bench import perf, perf_gramian

    # every shared parameter of the MLP is in a product x Wᵀ + b; the ViT's LayerNorms are not
    share, ops = perf_gramian.engine_share(perf_gramian._bench("mlp", 5))
    assert share == 1.0 and ops < 0.9
    share, ops = perf_gramian.engine_share(perf.bench("multifashion", 2))
    assert 0.9 < share < 1.0 and ops >= 1.0  # 4,608 rows against width 64: blocks everywhere
    monkeypatch.setattr(perf_gramian, "MODELS", ["mlp"])
    lines = perf_gramian.speed_table([2], 1, 0, lambda m: None)
    assert [line.split(" | ")[6] for line in lines[2:]] == perf_gramian.ENGINE_METHODS
    from mtlopt_bench.perf_small import mlp_bench

    cases = [("MLP", 32, n, lambda t, n=n: mlp_bench(t, width=32, batch=n)) for n in (8, 128)]
    cases.append(("encoder", 512, 6, lambda t: perf_gramian.encoder_bench(t, 2, 3)))
    crossover = perf_gramian.crossover_table(3, cases, 1, 0, lambda m: None)
    cells = [line.split(" | ") for line in crossover[2:]]
    assert [(c[2], c[3]) for c in cells] == [("8", "0.25"), ("128", "4"), ("6", "0.0117188")]
    assert [c[6] for c in cells] == ["engine", "J path", "engine"]  # few rows: the kernel pays
    assert {line.count("|") for line in crossover} == {11}  # every row fills the 10 columns
    for mode in ("jacobian", "gramian", "representation", "chunked"):
        result = perf_gramian.memory_child(3000, 2, mode)
        assert result["peak"] >= 0 and 2500 < result["shared"] < 3500
    vjp = perf_gramian.batched_vjp_lines(2, 1, 0, lambda m: None)
    assert vjp[0] == "1 thread:" and "2 threads:" in vjp and sum("| mlp T=2 |" in x for x in vjp) == 2
    # the fit recovers a known line and the 24 GiB bound follows from it
    points = [(t, p, 4.0 * t * p + 8.0 * p + 5e7) for t in (2, 8) for p in (10**6, 10**7)]
    fit = perf_gramian.fit_lines({"jacobian": points})
    assert fit[0].startswith("- jacobian: peak ≈ 4.00·T·P + 8.00·P bytes + 50 MB")
    assert f"P = 10 M: T ≤ {(24 * 2**30 - 8e7 - 5e7) / 4e7:.0f}" in fit[0]


def test_vit_finetune_trunk_is_pretrained_once_into_the_cache(tmp_path, monkeypatch):
    _require("vit_finetune")
    from mtlopt_bench import vit_finetune as vf

    monkeypatch.setenv("MTLOPT_CACHE", str(tmp_path / "cache"))
    tiny = vf.Pretraining(steps=2, batch=8)
    trunk = vf.pretrained_trunk(tiny)
    files = list((tmp_path / "cache" / "vit_finetune").glob("trunk-*.pt"))
    assert len(files) == 1 and files[0].name == f"trunk-{tiny.key()}.pt"
    assert set(vf.trunk_info(tiny)) >= {"steps", "source_accuracy"}
    # the second call reads the cache (no training): the same tensors
    again = vf.pretrained_trunk(tiny)
    assert all(torch_equal(trunk[k], again[k]) for k in trunk)
    # fine-tuning models share the trunk and, within a seed, the heads
    a, b = vf.build_model(trunk, tiny, seed=3), vf.build_model(trunk, tiny, seed=3)
    c = vf.build_model(trunk, tiny, seed=4)
    assert torch_equal(a.parts.weight, b.parts.weight)
    assert not torch_equal(a.parts.weight, c.parts.weight)
    assert torch_equal(a.blocks[0].mlp[0].weight, c.blocks[0].mlp[0].weight)


def test_vit_finetune_targets_label_each_patch_by_the_item_covering_it_most():
    _require("vit_finetune")
    from mtlopt_bench import vit_finetune as vf

    t = vf.target("test", 50, seed=0)
    assert t.images.shape == (50, 36, 36) and t.parts.shape == (50, 36)
    # brute force on one canvas: rebuild the two items' ink per 6×6 patch
    images, labels = vf.items("test")
    import numpy as np

    rng = np.random.default_rng(0)
    left, right = rng.choice(len(images), 50), rng.choice(len(images), 50)
    rows_a, cols_a = rng.integers(0, 19, 50), rng.integers(0, 7, 50)
    rows_b, cols_b = rng.integers(0, 19, 50), rng.integers(12, 19, 50)
    for i in (0, 7, 31):
        a = np.zeros((36, 36))
        b = np.zeros((36, 36))
        a[rows_a[i] : rows_a[i] + 18, cols_a[i] : cols_a[i] + 18] = images[left[i]].numpy()
        b[rows_b[i] : rows_b[i] + 18, cols_b[i] : cols_b[i] + 18] = images[right[i]].numpy()
        for p in range(36):
            r, c = divmod(p, 6)
            ia = a[6 * r : 6 * r + 6, 6 * c : 6 * c + 6].sum()
            ib = b[6 * r : 6 * r + 6, 6 * c : 6 * c + 6].sum()
            expected = 0 if max(ia, ib) < vf.INK else (1 if ia >= ib else 2)
            assert int(t.parts[i, p]) == expected
        assert int(t.classes[i, 0]) == int(labels[left[i]])
        assert np.allclose(t.images[i].numpy(), np.maximum(a, b))


def test_dtme_placement_runs_every_arm_paired_and_resumes(tmp_path, monkeypatch):
    _require("vit_finetune")
    from mtlopt_bench import dtme_placement as study
    from mtlopt_bench import vit_finetune as vf

    monkeypatch.setenv("MTLOPT_CACHE", str(tmp_path / "cache"))
    setting = vf.Setting(vf.Pretraining(steps=2, batch=8), 300, 60, 8)
    arms = ["ew", "dtme", "ew_compute", "random", "reverse", "swapped", "tm_only", "te_only",
            "dtme_budget", "dtme_upgrad", "dtme_intrain"]
    args = (tmp_path / "out", 2, 3, setting, arms, 1, 2, 5, "test")
    summary = study.run(*args)
    rows = {r["arm"]: r for r in summary["rows"]}
    assert set(rows) == set(arms) and all(r["seeds"] == 2 for r in rows.values())
    assert len(rows["dtme"]["gain_vs_ew"]) == 2 and len(rows["dtme"]["delta_m_vs_stl"]) == 2
    # EW given DTME's compute ran more steps than EW
    assert rows["ew_compute"]["steps"] >= rows["ew"]["steps"]
    # random keeps the plan's counts and branch; swapped exchanges the layers
    runs = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    by = {(r["seed"], r["arm"]): r["plan"] for r in runs}
    for seed in (0, 1):
        plan, random = by[(seed, "dtme")], by[(seed, "random")]
        assert len(random["modulation_layers"]) == len(plan["modulation_layers"])
        assert random["branch_layer"] == plan["branch_layer"]
        swapped = by[(seed, "swapped")]
        assert swapped["modulation_layers"] == plan["expansion_layers"]
        # the in-training arm planned from its own warm-up and expanded after it
        intrain = by[(seed, "dtme_intrain")]
        assert intrain["expanded_at"] == study.warm_steps(3) == 2
        assert intrain["modulation_layers"] or intrain["expansion_layers"]
        assert plan["stability"]["resamples"] == 5
    md = (tmp_path / "out" / "results.md").read_text()
    assert "random placement" in md and "Plan stability" in md
    assert (tmp_path / "out" / "placement.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a rerun reuses every finished run
    monkeypatch.setattr(study, "train_arm", lambda *a, **k: pytest.fail("retrained"))
    study.run(*args)


def test_dtme_placement_shards_split_seeds_and_run_the_placement_arms_first(tmp_path, monkeypatch):
    _require("vit_finetune")
    from mtlopt_bench import dtme_placement as study
    from mtlopt_bench import vit_finetune as vf

    monkeypatch.setenv("MTLOPT_CACHE", str(tmp_path / "cache"))
    setting = vf.Setting(vf.Pretraining(steps=2, batch=8), 300, 60, 8)
    order: list[tuple[int, str]] = []
    real = study.train_arm

    def recorded(setting, seed, arm, *rest, **kw):
        order.append((seed, arm))
        return real(setting, seed, arm, 2, *rest[1:], **kw)

    monkeypatch.setattr(study, "train_arm", recorded)
    arms = ["ew", "dtme", "tm_only", "random"]
    for shard in ((0, 2), (1, 2)):
        study.run(tmp_path / "out", 4, 2, setting, arms, 0, 2, 5, "test", shard=shard)
    assert sorted(order) == sorted((s, a) for s in range(4) for a in arms)
    # each shard ran its own seeds, the placement arms of every seed before the other arms
    assert order[:8] == [(0, "ew"), (0, "dtme"), (0, "random"), (2, "ew"), (2, "dtme"),
                         (2, "random"), (0, "tm_only"), (2, "tm_only")]
    assert {s for s, _ in order[8:]} == {1, 3}
    summary = study.run(tmp_path / "out", 4, 2, setting, arms, 0, 2, 5, "test",
                        summarise_only=True)
    assert {r["arm"]: r["seeds"] for r in summary["rows"]} == {a: 4 for a in arms}


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)
