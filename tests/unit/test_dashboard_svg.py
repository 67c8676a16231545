"""Server-side SVG (emu/dashboard/svg.py): line charts and layered graphs, parsed back as XML."""

import math
import xml.etree.ElementTree as ET

import pytest

from emu.dashboard.svg import GraphEdge, GraphNode, layered_graph, line_chart, nice_ticks

NS = "http://www.w3.org/2000/svg"
S = f"{{{NS}}}"


def parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)
    assert root.tag == f"{S}svg"
    return root


def polylines(root: ET.Element) -> dict[str, ET.Element]:
    found = [p for p in root.iter(f"{S}polyline") if "series" in p.get("class", "").split()]
    by_name = {p.get("data-series"): p for p in found}
    assert len(by_name) == len(found), "one polyline per series"
    return by_name


def points(polyline: ET.Element) -> list[tuple[float, float]]:
    return [tuple(float(v) for v in pair.split(",")) for pair in polyline.get("points").split()]


def texts(root: ET.Element, css_class: str | None = None) -> list[str]:
    return [t.text or "" for t in root.iter(f"{S}text")
            if css_class is None or css_class in t.get("class", "").split()]


# ---------------------------------------------------------------------- nice_ticks


@pytest.mark.parametrize("lo, hi, count", [(0, 1, 5), (0.13, 0.87, 4), (-3.2, 17.9, 5), (0, 10_000, 5),
                                           (1e-5, 3e-4, 4), (2.5, 2.51, 5), (-250, -7, 4)])
def test_nice_ticks_cover_the_range_with_round_equal_steps(lo, hi, count):
    ticks = nice_ticks(lo, hi, count)
    assert ticks[0] <= lo and ticks[-1] >= hi, ticks
    steps = [b - a for a, b in zip(ticks, ticks[1:])]
    step = steps[0]
    assert step > 0 and all(s == pytest.approx(step, rel=1e-6) for s in steps), ticks
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert any(mantissa == pytest.approx(m, rel=1e-6) for m in (1, 2, 2.5, 5, 10)), step
    # Ticks are whole multiples of the step, and there are about `count` of them, not hundreds.
    assert all(t / step == pytest.approx(round(t / step), abs=1e-6) for t in ticks), ticks
    assert 2 <= len(ticks) <= 2 * count + 2, ticks
    # The range is covered tightly: no whole step of slack on either side.
    assert ticks[1] > lo and ticks[-2] < hi, ticks


def test_nice_ticks_known_values():
    assert nice_ticks(0, 1, 5) == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert nice_ticks(0, 100, 4) == pytest.approx([0, 25, 50, 75, 100])


def test_nice_ticks_reversed_range_is_the_same_as_the_ordered_one():
    assert nice_ticks(10, -3, 5) == nice_ticks(-3, 10, 5)


@pytest.mark.parametrize("value", [0.0, 5.0, -2.0, 1e-4])
def test_nice_ticks_of_an_empty_range_surround_the_value(value):
    ticks = nice_ticks(value, value, 5)
    assert len(ticks) >= 2 and ticks[0] < value < ticks[-1], ticks


@pytest.mark.parametrize("lo, hi", [(math.nan, 1.0), (0.0, math.inf), (-math.inf, 0.0), (math.nan, math.nan)])
def test_nice_ticks_refuse_non_finite_bounds(lo, hi):
    with pytest.raises(ValueError, match="finite"):
        nice_ticks(lo, hi)


# ---------------------------------------------------------------------- line_chart


def test_one_polyline_per_named_series_in_the_data_range():
    root = parse(line_chart({"train": [(0, 2.0), (1, 1.5), (2, 1.0)], "eval": [(0, 2.2), (2, 1.4)]},
                            title="loss"))
    lines = polylines(root)
    assert set(lines) == {"train", "eval"}
    assert len(points(lines["train"])) == 3 and len(points(lines["eval"])) == 2
    assert lines["train"].get("stroke") != lines["eval"].get("stroke"), "series are told apart by colour"
    assert [t.text for t in lines["train"].iter(f"{S}title")] == ["train"]
    # Two series: a legend naming both.
    legend = [t.text for g in root.iter(f"{S}g") if g.get("class") == "legend" for t in g.iter(f"{S}text")]
    assert sorted(legend) == ["eval", "train"]
    assert "loss" in texts(root, "chart-title")
    assert "no data" not in texts(root)


def test_points_are_drawn_in_x_order_inside_the_plot_area_with_y_up():
    root = parse(line_chart({"loss": [(2, 1.0), (0, 3.0), (1, 2.0)]}))
    area = next(r for r in root.iter(f"{S}rect") if r.get("class") == "plot-area")
    x0, y0 = float(area.get("x")), float(area.get("y"))
    x1, y1 = x0 + float(area.get("width")), y0 + float(area.get("height"))
    pts = points(polylines(root)["loss"])
    assert all(x0 <= x <= x1 and y0 <= y <= y1 for x, y in pts), (pts, (x0, y0, x1, y1))
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    assert xs == sorted(xs) and len(set(xs)) == 3, "sorted by x"
    # The loss falls from 3 to 1: screen y grows downwards, so it rises on screen.
    assert ys[0] < ys[1] < ys[2]


def test_a_single_series_has_no_legend():
    root = parse(line_chart({"lr": [(0, 1e-4), (10, 3e-4)]}))
    assert [g for g in root.iter(f"{S}g") if g.get("class") == "legend"] == []
    assert set(polylines(root)) == {"lr"}


def test_non_finite_points_are_dropped():
    root = parse(line_chart({"loss": [(0, 1.0), (1, math.nan), (2, math.inf), (3, 2.0), (math.nan, 5.0),
                                      (math.inf, 1.0), (4, -math.inf)],
                             "all-nan": [(0, math.nan), (1, math.inf)]}))
    lines = polylines(root)
    assert set(lines) == {"loss"}, "a series with no finite point is not drawn"
    pts = points(lines["loss"])
    assert len(pts) == 2
    assert all(math.isfinite(v) for p in pts for v in p)
    # The tick labels stay finite too (no "nan"/"inf" axis from the dropped points).
    assert not any(word in t.lower() for t in texts(root, "tick") for word in ("nan", "inf"))


@pytest.mark.parametrize("series", [{}, {"loss": []}, {"loss": [(0, math.nan)], "lr": [(math.inf, 1.0)]}])
def test_no_data(series):
    root = parse(line_chart(series, title="loss"))
    assert polylines(root) == {}
    assert texts(root, "no-data") == ["no data"]


def test_one_point_is_drawn_as_a_dot():
    root = parse(line_chart({"eval": [(5, 0.5)]}))
    assert len(points(polylines(root)["eval"])) == 1
    assert len(list(root.iter(f"{S}circle"))) == 1


def test_labels_are_escaped_and_round_trip():
    name = 'a<b & "c">'
    other = "x&y</text><script>"
    title, x_label, y_label = '<title> & "T"', "step <k>", 'loss & "y"'
    svg = line_chart({name: [(0, 1), (1, 2)], other: [(0, 2), (1, 1)]}, title=title, x_label=x_label,
                     y_label=y_label, css_class='c"x')
    root = parse(svg)  # would raise on an unescaped <, & or "
    assert set(polylines(root)) == {name, other}
    assert root.get("aria-label") == title and root.get("class") == 'c"x'
    assert texts(root, "chart-title") == [title]
    assert sorted(texts(root, "axis-label")) == sorted([x_label, y_label])
    legend = [t.text for g in root.iter(f"{S}g") if g.get("class") == "legend" for t in g.iter(f"{S}text")]
    assert sorted(legend) == sorted([name, other])
    assert not list(root.iter(f"{S}script")), "no markup injected"


def test_a_long_series_is_thinned_but_keeps_its_spike_and_its_dip():
    n, spike_at, dip_at, max_points = 10_000, 5_037, 2_011, 600
    data = [(float(i), 0.5 + 0.4 * math.sin(i / 50.0)) for i in range(n)]
    data[spike_at] = (float(spike_at), 100.0)
    data[dip_at] = (float(dip_at), -50.0)
    root = parse(line_chart({"loss": data}, max_points=max_points))
    pts = points(polylines(root)["loss"])
    assert max_points // 2 <= len(pts) <= max_points + 1, len(pts)
    # y ticks for [-50, 100] are -50, 0, 50, 100: the spike sits exactly on the plot's top edge
    # (screen y grows downwards) and the dip on its bottom edge.
    area = next(r for r in root.iter(f"{S}rect") if r.get("class") == "plot-area")
    top, bottom = float(area.get("y")), float(area.get("y")) + float(area.get("height"))
    assert min(y for _, y in pts) == pytest.approx(top, abs=0.01), "the spike survived thinning"
    assert max(y for _, y in pts) == pytest.approx(bottom, abs=0.01), "the dip survived thinning"
    # ... each at its own x: the same screen point as in an unthinned drawing of the same data.
    full = points(polylines(parse(line_chart({"loss": data}, max_points=n)))["loss"])
    assert len(full) == n
    spike = [p for p in pts if p[1] == pytest.approx(top, abs=0.01)]
    dip = [p for p in pts if p[1] == pytest.approx(bottom, abs=0.01)]
    assert len(spike) == 1 and spike[0] == pytest.approx(min(full, key=lambda p: p[1]), abs=0.01)
    assert len(dip) == 1 and dip[0] == pytest.approx(max(full, key=lambda p: p[1]), abs=0.01)
    # The thinned line still follows the data: x strictly increasing and spanning the series.
    xs = [x for x, _ in pts]
    assert all(a < b for a, b in zip(xs, xs[1:]))
    assert xs[-1] == pytest.approx(full[-1][0], abs=0.01), "the line reaches the end of the series"


def test_a_short_series_is_not_thinned():
    data = [(i, float(i % 7)) for i in range(50)]
    assert len(points(polylines(parse(line_chart({"s": data}, max_points=600)))["s"])) == 50


# ---------------------------------------------------------------------- layered_graph


def node_groups(root: ET.Element) -> dict[str, ET.Element]:
    groups = [g for g in root.iter(f"{S}g") if "node" in g.get("class", "").split()]
    by_id = {g.get("data-id"): g for g in groups}
    assert len(by_id) == len(groups), "one group per node"
    return by_id


def box(group: ET.Element) -> tuple[float, float, float, float]:
    rect = group.find(f"{S}rect")
    return float(rect.get("x")), float(rect.get("y")), float(rect.get("width")), float(rect.get("height"))


def edges(root: ET.Element) -> list[tuple[str, str]]:
    return [(p.get("data-source"), p.get("data-target")) for p in root.iter(f"{S}path")
            if "edge" in p.get("class", "").split()]


def nodes(*ids: str) -> list[GraphNode]:
    return [GraphNode(i, [i]) for i in ids]


def test_a_chain_is_laid_out_left_to_right_whatever_the_input_order():
    root = parse(layered_graph(nodes("evaluate", "train", "data"), [("data", "train"), ("train", "evaluate")]))
    g = node_groups(root)
    assert set(g) == {"data", "train", "evaluate"}
    x = {k: box(v)[0] for k, v in g.items()}
    assert x["data"] < x["train"] < x["evaluate"]
    assert sorted(edges(root)) == [("data", "train"), ("train", "evaluate")]


def test_a_diamond_has_its_middle_nodes_in_one_column_without_overlap():
    root = parse(layered_graph(nodes("d", "c", "b", "a"),
                               [GraphEdge("a", "b"), GraphEdge("a", "c"), GraphEdge("b", "d"), GraphEdge("c", "d")]))
    g = node_groups(root)
    (xa, _, w, _), (xb, yb, _, hb), (xc, yc, _, hc), (xd, _, _, _) = (box(g[k]) for k in "abcd")
    assert xa + w <= xb and xb == xc and xc + w <= xd
    assert yb + hb <= yc or yc + hc <= yb, "b and c do not overlap"


def test_the_pipeline_dag_respects_every_dependency():
    stages = ["validate", "pretrain_stage1", "precompute", "pretrain_stage2", "train_decoder", "instruct",
              "evaluate", "register"]
    deps = [("validate", "pretrain_stage1"), ("pretrain_stage1", "precompute"), ("precompute", "pretrain_stage2"),
            ("precompute", "train_decoder"), ("pretrain_stage2", "instruct"), ("instruct", "evaluate"),
            ("train_decoder", "evaluate"), ("evaluate", "register")]
    root = parse(layered_graph(nodes(*reversed(stages)), deps))
    g = node_groups(root)
    for a, b in deps:
        assert box(g[a])[0] < box(g[b])[0], (a, b)
    # The whole drawing fits in the declared size.
    width, height = float(root.get("width")), float(root.get("height"))
    for group in g.values():
        x, y, w, h = box(group)
        assert 0 <= x and x + w <= width and 0 <= y and y + h <= height


def test_node_groups_carry_ids_classes_and_links():
    graph = [GraphNode("data/pairs v1", ["pairs", "12 shards"], href="/artifacts/1?x=1&y=2", kind="artifact ok",
                       tooltip="md5 abc"),
             GraphNode("train", ["train"], kind="stage")]
    root = parse(layered_graph(graph, [("data/pairs v1", "train")], id_prefix="lin"))
    g = node_groups(root)
    assert g["data/pairs v1"].get("id").startswith("lin-data_pairs_v1-"), "unsafe characters replaced, plus a hash"
    assert g["train"].get("id") == "lin-train"
    assert g["data/pairs v1"].get("class").split() == ["node", "artifact", "ok"]
    assert [t.text for t in g["data/pairs v1"].findall(f"{S}text")] == ["pairs", "12 shards"]
    assert g["data/pairs v1"].find(f"{S}title").text == "md5 abc"
    # The linked node sits inside an <a href>; the other one does not.
    links = [a for a in root if a.tag == f"{S}a"]
    assert len(links) == 1 and links[0].get("href") == "/artifacts/1?x=1&y=2"
    assert links[0].find(f"{S}g").get("data-id") == "data/pairs v1"
    assert [c.get("data-id") for c in root if c.tag == f"{S}g"] == ["train"]
    # The arrow marker is named after the prefix, so two graphs on one page do not clash.
    assert [m.get("id") for m in root.iter(f"{S}marker")] == ["lin-arrow"]
    assert all(p.get("marker-end") == "url(#lin-arrow)" for p in root.iter(f"{S}path") if p.get("data-source"))


def test_edges_to_unknown_nodes_self_loops_and_duplicates_are_dropped():
    graph = nodes("a", "b") + [GraphNode("a", ["a duplicate"])]
    root = parse(layered_graph(graph, [("a", "b"), GraphEdge("a", "b", kind="dashed"), ("a", "ghost"),
                                       ("ghost", "b"), ("b", "b")]))
    assert edges(root) == [("a", "b")]
    g = node_groups(root)
    assert set(g) == {"a", "b"}
    assert [t.text for t in g["a"].findall(f"{S}text")] == ["a"], "the first node of an id wins"


def test_dashed_edges_and_edge_labels():
    root = parse(layered_graph(nodes("a", "b", "c"), [GraphEdge("a", "b", kind="dashed", label="reads <x>"),
                                                      GraphEdge("b", "c")]))
    paths = {(p.get("data-source"), p.get("data-target")): p for p in root.iter(f"{S}path") if p.get("data-source")}
    assert paths[("a", "b")].get("stroke-dasharray") and paths[("b", "c")].get("stroke-dasharray") is None
    assert paths[("a", "b")].find(f"{S}title").text == "reads <x>"
    assert paths[("b", "c")].find(f"{S}title") is None


def test_a_cycle_still_draws_every_node_and_edge():
    root = parse(layered_graph(nodes("a", "b", "c", "d"), [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")]))
    g = node_groups(root)
    assert set(g) == {"a", "b", "c", "d"}
    assert sorted(edges(root)) == [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")], "the closing edge is drawn"
    x = {k: box(v)[0] for k, v in g.items()}
    assert x["a"] < x["b"] < x["c"] < x["d"], "the cycle is broken at its closing edge"


def test_a_two_cycle_and_isolated_nodes():
    root = parse(layered_graph(nodes("solo", "p", "q"), [("p", "q"), ("q", "p")]))
    assert set(node_groups(root)) == {"solo", "p", "q"}
    assert sorted(edges(root)) == [("p", "q"), ("q", "p")]


def test_an_empty_graph_is_a_valid_svg():
    root = parse(layered_graph([], []))
    assert node_groups(root) == {} and edges(root) == []


def test_graph_text_is_escaped_and_round_trips():
    nasty = 'x<y & "z">'
    graph = [GraphNode(nasty, [nasty, "</text><script>alert(1)</script>"], href='/a?b=1&c="2"', kind='k"<',
                       tooltip="t & <u>"),
             GraphNode("plain", ["plain"])]
    root = parse(layered_graph(graph, [GraphEdge(nasty, "plain", label="<&>")], id_prefix='p"<'))
    g = node_groups(root)
    assert set(g) == {nasty, "plain"}
    assert [t.text for t in g[nasty].findall(f"{S}text")] == [nasty, "</text><script>alert(1)</script>"]
    assert g[nasty].find(f"{S}title").text == "t & <u>"
    assert next(a for a in root if a.tag == f"{S}a").get("href") == '/a?b=1&c="2"'
    assert edges(root) == [(nasty, "plain")]
    assert not list(root.iter(f"{S}script"))
    assert all(c.isalnum() or c in "_-" for c in g[nasty].get("id")), g[nasty].get("id")


def test_long_lines_are_shortened_and_at_most_six_lines_drawn():
    long = "x" * 100
    root = parse(layered_graph([GraphNode("n", [long] + [f"l{i}" for i in range(9)])], [], max_chars=20))
    drawn = [t.text for t in node_groups(root)["n"].findall(f"{S}text")]
    assert len(drawn) == 6
    assert len(drawn[0]) == 20 and drawn[0].endswith("\u2026")


@pytest.mark.parametrize("lo, hi", [(0.3, 0.1 * 3), (3e-4, math.nextafter(3e-4, 1)), (1e16, 1e16 + 2), (0, 5e-324),
                                    (-1e308, 1e308)])
def test_nice_ticks_of_float_edge_ranges_end_and_cover_them(lo, hi):
    # A constant learning rate that differs in the last bit once made the tick loop spin forever.
    ticks = nice_ticks(lo, hi)
    assert 2 <= len(ticks) < 20 and ticks[0] <= min(lo, hi) and ticks[-1] >= max(lo, hi)
    assert "polyline" in line_chart({"lr": [(0, lo), (1, hi)]})


def test_dom_ids_of_distinct_nodes_differ():
    root = parse(layered_graph([GraphNode("a b", ["x"]), GraphNode("a_b", ["y"])], []))
    ids = [g.get("id") for g in root.iter(f"{S}g") if "node" in (g.get("class") or "")]
    assert len(ids) == 2 and len(set(ids)) == 2


def test_control_characters_in_labels_keep_the_svg_well_formed():
    root = parse(line_chart({"\x1b[31mloss": [(0, 1.0), (1, 2.0)]}, title="a\x00b"))
    assert "[31mloss" in {p.get("data-series")[-8:] for p in root.iter(f"{S}polyline")}
