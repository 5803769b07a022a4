"""Stratified splits: equal per-stratum proportions, seeded determinism, tie-safe bins, safe writing."""

import json
import random
from collections import Counter

import pytest

from grpokit.data.split import quantile_bins, stratified_split, write_split
from grpokit.errors import DataError

from conftest import run_cli


def make_rows(n=101, seed=1):
    rng = random.Random(seed)
    return [{"id": i, "length": rng.choice([3, 3, 3, 7, 12, 40, rng.randint(0, 100)]),
             "topic": rng.choice(["math", "code", "chat"]), "_line": i + 1} for i in range(n)]


def write_rows(path, rows):
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "_line"}) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("by", ["length", "topic"])
def test_every_stratum_split_in_the_same_proportion(by):
    rows = make_rows()
    first, second, report = stratified_split(rows, by, quantiles=4, ratio=0.3, seed=0)
    assert len(first) + len(second) == len(rows) and not {r["id"] for r in first} & {r["id"] for r in second}
    assert sum(s["rows"] for s in report["strata"]) == len(rows)
    for stratum in report["strata"]:
        assert stratum["first"] == round(0.3 * stratum["rows"])
        assert abs(stratum["first"] - 0.3 * stratum["rows"]) <= 1  # the proportion, within one row
    assert [r["id"] for r in first] == sorted(r["id"] for r in first)  # input order kept
    if by == "topic":
        assert report["kind"] == "categorical" and [s["stratum"] for s in report["strata"]] == ["chat", "code", "math"]
        counts = Counter(r["topic"] for r in first)
        assert all(counts[s["stratum"]] == s["first"] for s in report["strata"])


def test_seed_makes_it_deterministic_and_a_new_seed_changes_it():
    rows = make_rows()
    ids = lambda part: [r["id"] for r in part]  # noqa: E731
    a = stratified_split(rows, "length", 4, 0.5, seed=3)
    assert ids(a[0]) == ids(stratified_split(rows, "length", 4, 0.5, seed=3)[0])
    b = stratified_split(rows, "length", 4, 0.5, seed=4)
    assert ids(a[0]) != ids(b[0])
    assert [s["first"] for s in a[2]["strata"]] == [s["first"] for s in b[2]["strata"]]


def test_quantile_bins_with_ties_are_never_empty():
    # quartiles of [1]*6 + [10, 20] are 1, 1, 1: one edge; the bin below it, [1, 1), would be empty
    bins, edges = quantile_bins([1, 1, 1, 1, 1, 1, 10, 20], 4)
    assert edges == [1.0, 3.25, 20.0] and bins == [0, 0, 0, 0, 0, 0, 1, 1]
    bins, edges = quantile_bins([0, 10, 10, 10], 3)
    assert edges == [0.0, 10.0, 10.0] and bins == [0, 1, 1, 1]
    bins, edges = quantile_bins([5] * 4, 4)
    assert edges == [5.0, 5.0] and set(bins) == {0}
    bins, edges = quantile_bins(list(range(8)), 4)
    assert edges == [0.0, 1.75, 3.5, 5.25, 7.0] and Counter(bins) == {0: 2, 1: 2, 2: 2, 3: 2}
    _, _, report = stratified_split([{"x": v} for v in [1, 1, 1, 1, 1, 1, 10, 20]], "x", 4, 0.5, 0)
    assert [s["stratum"] for s in report["strata"]] == ["[1, 3.25)", "[3.25, 20]"]
    assert report["edges"] == [1.0, 3.25, 20.0]


def test_split_errors():
    rows = make_rows(5)
    del rows[2]["length"]
    with pytest.raises(DataError, match=r"in.jsonl:3: row has no column 'length' \(it has \['id', 'topic'\]\)"):
        stratified_split(rows, "length", source="in.jsonl")
    rows = make_rows(5)
    rows[1]["length"] = None
    with pytest.raises(DataError, match=r"rows:2: column 'length' is None here but numeric elsewhere"):
        stratified_split(rows, "length")
    for ratio in (0, 1, 1.5, -0.1):
        with pytest.raises(DataError, match="ratio must be strictly between 0 and 1"):
            stratified_split(make_rows(), "topic", ratio=ratio)
    with pytest.raises(DataError, match="the first split would be empty"):
        stratified_split(make_rows(4), "id", ratio=0.2)  # one stratum per id: round(0.2) == 0 everywhere
    with pytest.raises(DataError, match="no rows to split"):
        stratified_split([], "x")


def test_write_split_refuses_overlapping_or_existing_outputs(tmp_path):
    src = write_rows(tmp_path / "in.jsonl", make_rows())
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    with pytest.raises(DataError, match="output is the input file"):
        write_split(src, "topic", src, b)
    with pytest.raises(DataError, match="the same path is given for two outputs"):
        write_split(src, "topic", a, tmp_path / "." / "a.jsonl")
    b.write_text("keep me\n")
    with pytest.raises(DataError, match="b.jsonl: already exists; pass --overwrite"):
        write_split(src, "topic", a, b)
    assert b.read_text() == "keep me\n" and not a.exists()
    report = write_split(src, "topic", a, b, overwrite=True)
    assert report["paths"]["plot"] == str(tmp_path / "a.split.png")
    assert len(a.read_text().splitlines()) == report["first"] and len(b.read_text().splitlines()) == report["second"]
    assert "_line" not in json.loads(a.read_text().splitlines()[0])


def test_cli_split_prints_table_and_writes_png(tmp_path, capsys):
    src = write_rows(tmp_path / "in.jsonl", make_rows())
    a, b, png = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "plots" / "split.png"
    png.parent.mkdir()
    assert run_cli(["data", "split", str(src), "--by", "length", "--quantiles", "4", "--ratio", "0.5", "--seed", "0",
                    "--out", str(a), str(b), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = " ".join(capsys.readouterr().out.split())  # the table's title may wrap
    assert "in.jsonl split by 'length' (numeric, seed 0)" in out and "bin edges: " in out and "total" in out
    assert f"wrote {a}: " in out
    first = [json.loads(line)["id"] for line in a.read_text().splitlines()]
    assert first == [r["id"] for r in stratified_split(make_rows(), "length", 4, 0.5, 0)[0]]
    with pytest.raises(DataError, match="already exists"):
        run_cli(["data", "split", str(src), "--by", "topic", "--out", str(a), str(b), "--plot", str(png)])
    run_cli(["data", "split", str(src), "--by", "topic", "--out", str(a), str(b), "--overwrite"])
    assert (tmp_path / "a.split.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(DataError, match=r"in.jsonl:1: row has no column 'nope'"):
        run_cli(["data", "split", str(src), "--by", "nope", "--out", str(a), str(b), "--overwrite"])
