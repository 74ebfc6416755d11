"""Results files, the Pareto front and choosing a stitch for a budget."""
import json
import math
import random

import pytest

from snnet.results import StitchResult, load_results, markdown_table, pareto_front, plot_pareto, save_results, select_stitch


def make_results(n=30, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        flops = rng.randint(1, 100) * 10**8
        out.append(StitchResult(i, f"s{i}", flops, flops // 10, i < 3, acc1=rng.uniform(50, 90), acc5=rng.uniform(90, 100)))
    return out


def test_pareto_front_is_exactly_the_undominated_set():
    results = make_results()
    front = pareto_front(results)
    dominated = {
        r.id for r in results
        if any(o.flops <= r.flops and o.acc1 >= r.acc1 and (o.flops, o.acc1) != (r.flops, r.acc1) for o in results)
    }
    assert {r.id for r in front} == {r.id for r in results} - dominated
    assert [r.flops for r in front] == sorted(r.flops for r in front)
    assert [r.acc1 for r in front] == sorted(r.acc1 for r in front)


def test_select_is_the_most_accurate_within_every_budget():
    results = make_results()
    for budget in (2.0, 5.0, 9.0):
        best = select_stitch(results, max_gflops=budget)
        within = [r for r in results if r.gflops <= budget]
        assert best.acc1 == max(r.acc1 for r in within) and best.gflops <= budget
    both = select_stitch(results, max_gflops=8.0, max_params=3e8)
    assert both.gflops <= 8.0 and both.params <= 3e8
    assert both.acc1 == max(r.acc1 for r in results if r.gflops <= 8.0 and r.params <= 3e8)


def test_budget_below_cheapest_names_the_cheapest_stitch():
    results = make_results()
    cheapest = min(results, key=lambda r: r.flops)
    with pytest.raises(ValueError, match=rf"cheapest stitch {cheapest.id} \({cheapest.name}\)"):
        select_stitch(results, max_gflops=cheapest.gflops / 2)
    with pytest.raises(ValueError, match="at least one budget"):
        select_stitch(results)
    with pytest.raises(ValueError, match="latency"):
        select_stitch(results, max_latency_ms=1.0)
    with pytest.raises(ValueError, match="unknown metric 'top1'"):
        select_stitch(results, max_gflops=100, metric="top1")


def test_results_round_trip_through_json_and_csv(tmp_path):
    results = make_results(5)
    save_results(results, tmp_path / "r.json", tmp_path / "r.csv")
    assert load_results(tmp_path / "r.json") == results
    lines = (tmp_path / "r.csv").read_text().splitlines()
    assert lines[0].startswith("id,name,flops,params,is_anchor,acc1,acc5") and len(lines) == 6
    (tmp_path / "bad.json").write_text(json.dumps([{"id": 0}]))
    with pytest.raises(ValueError, match="lacks"):
        load_results(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_results(tmp_path / "nope.json")


def test_pareto_plot_is_a_png(tmp_path):
    path = plot_pareto(make_results(), tmp_path / "p.png", before=make_results(seed=1))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_comparison_reports_the_change_per_stitch():
    before, after = make_results(seed=0), make_results(seed=1)
    for b, a in zip(before, after):
        a.flops, a.params, a.name = b.flops, b.params, b.name
    lines = markdown_table(after, before=before).splitlines()
    assert lines[0].endswith("| acc1 before | change |")
    for line, b, a in zip(lines[2:], before, after):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == str(a.id)
        assert float(cells[-2]) == pytest.approx(b.acc1, abs=0.005)
        assert float(cells[-1]) == pytest.approx(a.acc1 - b.acc1, abs=0.01)
    with pytest.raises(ValueError, match=r"lack stitch ids \[29\]"):
        markdown_table(after, before=before[:-1])


def test_conflicting_budgets_say_each_fits_alone_and_only_the_too_small_one_is_named():
    few_flops = StitchResult(0, "few_flops", 10**9, 9 * 10**6, True, 70.0)
    few_params = StitchResult(1, "few_params", 4 * 10**9, 10**6, True, 72.0)
    with pytest.raises(ValueError, match="each of max gflops 2, max params 2e\\+06 is met by some stitch, but no stitch meets all"):
        select_stitch([few_flops, few_params], max_gflops=2, max_params=2e6)
    with pytest.raises(ValueError) as info:
        select_stitch([few_flops, few_params], max_gflops=2, max_params=5e5)
    assert "max params 500000 is below the cheapest stitch 1" in str(info.value) and "max gflops" not in str(info.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0, 0.0, True])
def test_budgets_must_be_finite_and_positive(value):
    rows = [StitchResult(0, "a", 10**9, 10, True, 70.0)]
    with pytest.raises(ValueError, match=f"max_gflops must be a finite positive number, got {value!r}"):
        select_stitch(rows, max_gflops=value)


def test_a_perplexity_above_100_is_a_valid_row(tmp_path):
    """Perplexity is lower-is-better and unbounded (an untrained byte-level LM: about 256), not a percentage."""
    rows = [StitchResult(i, f"s{i}", 10**9 * (i + 1), 10, i == 0, loss=5.5 - i, ppl=math.exp(5.5 - i)).to_dict() for i in range(2)]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(rows))
    assert [r.ppl for r in load_results(path)] == [math.exp(5.5), math.exp(4.5)]


@pytest.mark.parametrize("field, value, message", [
    ("acc1", float("nan"), "acc1 must be a finite non-negative number or null, got nan"),
    ("acc1", 101.0, "acc1 is a percentage, at most 100, got 101.0"),
    ("flops", -5, "flops must be a finite non-negative number, got -5"),
    ("latency_ms", float("inf"), "latency_ms must be a finite non-negative number or null, got inf"),
    ("id", "3", "id must be a non-negative integer, got '3'"),
    ("is_anchor", "yes", "is_anchor must be true or false, got 'yes'"),
    ("ppl", float("nan"), "ppl must be a finite non-negative number or null, got nan"),
    ("ppl", 0.5, "ppl is a perplexity, at least 1, got 0.5"),
])
def test_every_results_row_is_checked_where_it_is_read(tmp_path, field, value, message):
    rows = [StitchResult(i, f"s{i}", 10**9 * (i + 1), 10, i == 0, 70.0 + i).to_dict() for i in range(3)]
    rows[1][field] = value
    path = tmp_path / "r.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(ValueError, match=f"results file {path}: row 1: .*{message[:30]}"):
        load_results(path)
