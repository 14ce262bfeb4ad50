"""`rankformer perturb stats` on hand-built result folders: per-gene aggregates equal a plain pandas
group-by; the null is other genes' rows from the same rank windows; a position effect alone makes
nothing significant, a planted effect does; bad input is named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rankformer.cli import main as cli
from rankformer.errors import InputError
from rankformer.perturb.stats import perturb_stats


def write_results(out: Path, df: pd.DataFrame, shards: int = 3) -> None:
    """``df`` as a perturbation output: Parquet shards and their manifest."""
    out.mkdir(parents=True)
    names = []
    for i, part in enumerate(np.array_split(np.arange(len(df)), shards)):
        name = f"part-{i:06d}.parquet"
        table = pa.Table.from_pandas(df.iloc[part].reset_index(drop=True), preserve_index=False)
        pq.write_table(table, out / name)
        names.append(name)
    (out / "manifest.json").write_text(json.dumps({"job": "perturb", "files": names, "shards": names}))


def rows(genes: np.ndarray, rank: np.ndarray, shift: np.ndarray, rng: np.random.Generator) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "cell_id": [f"c{i}" for i in range(len(genes))],
            "perturbed": [[f"G{g}"] for g in genes],
            "rank": rank,
            "cell_cosine": 1.0 - np.abs(shift) - rng.random(len(genes)) * 1e-3,
            "gene_mean_cosine": rng.random(len(genes)),
            "shift_B": shift,
            "shift_A": -shift + rng.normal(0, 0.01, len(genes)),
        }
    )


def test_aggregates_equal_a_plain_group_by(tmp_path):
    rng = np.random.default_rng(0)
    n = 600
    df = rows(rng.integers(0, 40, n), rng.integers(-1, 30, n), rng.normal(0, 1, n), rng)
    df.loc[rng.choice(n, 25, replace=False), "gene_mean_cosine"] = np.nan  # no gene left to compare
    df.loc[rng.choice(n, 5, replace=False), "shift_A"] = np.nan
    df.at[0, "perturbed"] = ["G1", "G2"]  # a combination is its own key
    write_results(tmp_path / "out", df)
    got = perturb_stats(str(tmp_path / "out"), goal_state="B").set_index("perturbed")

    df["key"] = df["perturbed"].map(",".join)
    g = df.groupby("key")
    want = pd.DataFrame(
        {
            "n_cells": g.size(),
            "effect_mean": g["shift_B"].mean(),
            "cell_cosine_mean": g["cell_cosine"].mean(),
            "gene_mean_cosine_mean": g["gene_mean_cosine"].mean(),  # NaNs skipped
            "shift_A_mean": g["shift_A"].mean(),
            "shift_B_mean": g["shift_B"].mean(),
        }
    )
    from scipy import stats as st

    half = st.t.ppf(0.975, g.size() - 1) * g["shift_B"].std() / np.sqrt(g.size())
    want["effect_ci_low"] = want["effect_mean"] - half
    want["effect_ci_high"] = want["effect_mean"] + half
    got = got.loc[want.index]
    assert set(got.index) == set(want.index) and "G1,G2" in got.index
    assert (got["n_cells"] == want["n_cells"]).all()
    for col in want.columns.drop("n_cells"):
        np.testing.assert_allclose(got[col], want[col], rtol=1e-9, atol=1e-12, err_msg=col)
    assert np.isnan(got.loc["G1,G2", "effect_ci_low"])  # one row: no interval
    assert got["p_value"].between(0, 1).all() and got["fdr"].ge(got["p_value"] - 1e-12).all()
    written = pd.read_parquet(tmp_path / "out" / "stats.parquet")
    assert len(written) == len(got) and (tmp_path / "out" / "stats.png").exists()
    effect = perturb_stats(str(tmp_path / "out")).set_index("perturbed")  # no goal: 1 - cell_cosine
    np.testing.assert_allclose(effect.loc[want.index, "effect_mean"], 1.0 - want["cell_cosine_mean"])


def plain_van_elteren(df: pd.DataFrame, key: str) -> tuple[float, float]:
    """Van Elteren's test written out per stratum with scipy's ranks: (p-value, null mean)."""
    from scipy import stats as st

    t = v = null = weight = 0.0
    for _, g in df.groupby("stratum"):
        mine = (g["key"] == key).to_numpy()
        n, m = mine.sum(), (~mine).sum()
        if not n or not m:
            continue
        big_n = n + m
        ranks = st.rankdata(g["effect"])
        _, counts = np.unique(g["effect"], return_counts=True)
        var = n * m / 12 * (big_n + 1 - (counts**3 - counts).sum() / (big_n * (big_n - 1)))
        t += (ranks[mine].sum() - n * (big_n + 1) / 2) / (big_n + 1)
        v += var / (big_n + 1) ** 2
        null += n * g["effect"].to_numpy()[~mine].mean()
        weight += n
    return float(2 * st.norm.sf(abs(t) / np.sqrt(v))), null / weight


@pytest.mark.parametrize("window", [1, 4, 10**6])
def test_the_test_equals_van_elteren_written_out_and_mann_whitney_in_one_stratum(tmp_path, window):
    from scipy import stats as st

    rng = np.random.default_rng(1)
    n = 900
    genes = rng.integers(0, 12, n)
    rank = rng.integers(0 if window == 10**6 else -1, 25, n)  # -1 (absent) is a stratum of its own
    shift = np.round(rng.normal(0, 1, n) + 0.6 * (genes == 3) - 0.02 * rank, 1)  # rounded: many ties
    rank[genes == 11] = 40  # ranks only gene 11 holds (unless one stratum): no test for it
    df = rows(genes, rank, shift, rng)
    write_results(tmp_path / "out", df)
    got = perturb_stats(str(tmp_path / "out"), goal_state="B", rank_window=window).set_index("perturbed")
    df["key"] = df["perturbed"].map(",".join)
    df["effect"] = df["shift_B"]
    df["stratum"] = np.where(df["rank"] < 0, -1, df["rank"] // window)  # absent genes: their own
    for key in got.index:
        if window < 100 and key == "G11":
            assert np.isnan(got.loc[key, "p_value"]) and np.isnan(got.loc[key, "null_effect_mean"])
            continue
        p, null = plain_van_elteren(df, key)
        np.testing.assert_allclose(
            got.loc[key, ["p_value", "null_effect_mean"]].to_numpy(float), [p, null], rtol=1e-9
        )
        if window == 10**6:  # one stratum: the Mann-Whitney U test, ties corrected
            mine = df["key"] == key
            u = st.mannwhitneyu(df.effect[mine], df.effect[~mine], use_continuity=False, method="asymptotic")
            np.testing.assert_allclose(got.loc[key, "p_value"], u.pvalue, rtol=1e-9)
    assert got.loc["G3", "p_value"] < 1e-3


def test_a_position_effect_alone_is_not_significant_a_planted_one_is(tmp_path):
    """Genes sit near their own typical ranks and a deletion near the top moves a cell more (the
    position artefact). Against genes at any rank the top genes would all look significant; against
    the same ranks only the planted genes are."""
    rng = np.random.default_rng(2)
    n_genes, cells = 300, 120
    genes = np.tile(np.arange(n_genes), cells)
    rank = np.clip(genes // 3 + rng.integers(-4, 5, len(genes)), 0, None)  # ~27 genes per rank
    shift = 0.5 / (1.0 + rank) + rng.normal(0, 0.02, len(genes))
    planted = [5, 150, 280]
    shift[np.isin(genes, planted)] += 0.03
    write_results(tmp_path / "out", rows(genes, rank, shift, rng))
    stats = perturb_stats(str(tmp_path / "out"), goal_state="B").set_index("perturbed")
    called = set(stats.index[stats["significant"]])
    assert called == {f"G{g}" for g in planted}
    top = stats.loc[[f"G{g}" for g in range(6) if g != 5]]
    assert (top["effect_mean"] > 5 * stats.loc["G280", "effect_mean"]).all()  # large, not called
    assert (top["null_effect_mean"] > 5 * stats.loc["G280", "null_effect_mean"]).all()
    assert cli(["perturb", "stats", str(tmp_path / "out"), "--goal-state", "B", "--rank-window", "1000"]) == 0
    wide = pd.read_parquet(tmp_path / "out" / "stats.parquet").set_index("perturbed")
    assert set(top.index) <= set(wide.index[wide["significant"]])  # the unmatched null is fooled


def test_a_small_memory_budget_spills_to_disk_and_changes_nothing(tmp_path, monkeypatch):
    """With room for a few rows the test runs stratum range by stratum range from rows set aside
    on disk (a stratum larger than the budget alone); every column equals the one-pass result."""
    import tempfile

    rng = np.random.default_rng(4)
    n = 2000
    genes = rng.integers(0, 60, n)
    rank = rng.integers(-1, 40, n)
    rank[:300] = 3  # one stratum far over the budget
    df = rows(genes, rank, np.round(rng.normal(0, 1, n) - 0.01 * rank, 1), rng)
    df.loc[rng.choice(n, 30, replace=False), "shift_B"] = np.nan  # no effect: left out of the test
    df.at[5, "perturbed"] = ["G1", "G7"]
    write_results(tmp_path / "out", df, shards=5)
    whole = perturb_stats(str(tmp_path / "out"), goal_state="B", rank_window=3)

    spilled: list[str] = []
    real_fromfile = np.fromfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(
        np, "fromfile", lambda path, *a, **k: (spilled.append(path), real_fromfile(path, *a, **k))[1]
    )
    small = perturb_stats(str(tmp_path / "out"), goal_state="B", rank_window=3, rows_in_memory=40)
    assert spilled and all(path.startswith(str(tmp_path / "rankformer-stats-")) for path in spilled)
    assert not list(tmp_path.glob("rankformer-stats-*"))  # removed after
    pd.testing.assert_frame_equal(small, whole, rtol=1e-12)
    assert (
        cli(["perturb", "stats", str(tmp_path / "out"), "--goal-state", "B", "--rows-in-memory", "100"]) == 0
    )


def test_stratum_ranges_hold_the_budget_or_one_stratum():
    from rankformer.perturb.stats import buckets

    assert list(buckets(np.array([3, 0, 4, 9, 1, 1, 2, 0]), 5)) == [(0, 2), (2, 3), (3, 4), (4, 8)]
    assert list(buckets(np.array([0, 0]), 5)) == []


def test_bad_input_is_named(tmp_path, capsys):
    rng = np.random.default_rng(3)
    write_results(tmp_path / "out", rows(np.arange(10), np.arange(10), rng.normal(0, 1, 10), rng))
    with pytest.raises(InputError, match=r"no shift toward 'C'.*\['B', 'A'\]"):
        perturb_stats(str(tmp_path / "out"), goal_state="C")
    assert cli(["perturb", "stats", str(tmp_path / "out"), "--goal-state", "C"]) == 2
    assert "no shift toward 'C'" in capsys.readouterr().err
    assert cli(["perturb", "stats", str(tmp_path / "out"), "--goal-state", "B"]) == 0  # one gene per rank
    assert "10 untested: no other gene was perturbed at their ranks" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "manifest.json").write_text(
        json.dumps({"job": "perturb", "files": [], "shards": []})
    )
    with pytest.raises(InputError, match="holds no perturbation rows"):
        perturb_stats(str(tmp_path / "empty"))
    with pytest.raises(InputError, match="rank_window is 0"):
        perturb_stats(str(tmp_path / "out"), rank_window=0)
    with pytest.raises(InputError, match="rows_in_memory is 0"):
        perturb_stats(str(tmp_path / "out"), rows_in_memory=0)


def _gene_rows(rng: np.random.Generator, n: int) -> pd.DataFrame:
    keys = [[f"G{g}"] for g in rng.integers(0, 12, n)]
    keys[0] = ["G1", "G2"]  # a combination is its own perturbation
    cos = 1.0 - np.abs(rng.normal(0, 0.05, n)) * rng.integers(1, 4, n)
    cos[rng.choice(n, 7, replace=False)] = np.nan  # not compared: left out
    return pd.DataFrame(
        {
            "cell_id": [f"c{i % 50}" for i in range(n)],
            "perturbed": keys,
            "affected_gene": [f"A{a}" for a in rng.integers(0, 30, n)],
            "cosine": cos,
        }
    )


@pytest.mark.parametrize("rows_in_memory", [1_000_000, 300])  # all in memory; partitions on disk
def test_affected_genes_equal_a_plain_group_by(tmp_path, rows_in_memory, capsys):
    from scipy import stats as st

    from rankformer.perturb.affected import affected_stats

    rng = np.random.default_rng(1)
    df = _gene_rows(rng, 4000)
    out = tmp_path / "out"
    write_results(out, df.iloc[:3], shards=1)  # the per-cell rows are not read here
    names = []
    for i, part in enumerate(np.array_split(np.arange(len(df)), 3)):
        name = f"part-{i:06d}.parquet"
        pq.write_table(pa.Table.from_pandas(df.iloc[part], preserve_index=False), out / f"genes-{name}")
        names.append(name)
    (out / "manifest.json").write_text(
        json.dumps({"job": "perturb", "files": names + [f"genes-{n}" for n in names], "shards": names})
    )
    got = affected_stats(str(out), top=0, rows_in_memory=rows_in_memory)
    ok = df[df.cosine.notna()].assign(key=lambda d: d.perturbed.map(",".join), shift=lambda d: 1 - d.cosine)
    g = ok.groupby(["key", "affected_gene"])["shift"]
    want = pd.DataFrame({"n": g.size(), "mean": g.mean(), "sd": g.std()})
    want["half"] = st.t.ppf(0.975, want.n - 1) * want.sd / np.sqrt(want.n)
    got_i = got.set_index(["perturbed", "affected_gene"]).sort_index()
    want = want.sort_index()
    assert got_i.index.equals(want.index)
    assert (got_i.n_cells == want.n).all()
    np.testing.assert_allclose(got_i.shift_mean, want["mean"], rtol=1e-12)
    np.testing.assert_allclose(got_i.shift_ci_high - got_i.shift_mean, want.half, rtol=1e-9)
    # within each perturbation, ranked by mean shift; --top keeps that many
    for _, part in got.groupby("perturbed", sort=False):
        assert part["rank"].tolist() == list(range(1, len(part) + 1))
        assert part.shift_mean.is_monotonic_decreasing
    assert list(dict.fromkeys(got.perturbed))[:2] == ["G1,G2", df.perturbed[1][0]]  # first appearance
    assert cli(["perturb", "stats", str(out), "--by", "affected-gene", "--top", "3"]) == 0
    top3 = pd.read_csv(out / "affected.csv")
    assert top3.groupby("perturbed").size().max() == 3
    assert "most moved genes (top 3 each)" in capsys.readouterr().out


def test_the_mixture_model_separates_impactful_perturbations(tmp_path):
    from rankformer.perturb.mixture import impact_mixture

    rng = np.random.default_rng(3)
    genes = rng.integers(0, 60, 3000)
    shift = rng.normal(0, 0.01, 3000) + np.where(genes < 6, 0.2, 0.0)  # six impactful genes
    write_results(tmp_path / "out", rows(genes, rng.integers(0, 20, 3000), shift, rng))
    res = perturb_stats(str(tmp_path / "out"), goal_state="B", mixture=True).set_index("perturbed")
    impactful = {f"G{g}" for g in range(6)}
    assert set(res.index[res.impactful]) == impactful
    assert res.loc[list(impactful), "impact_posterior"].min() > 0.99
    assert res.drop(index=list(impactful)).impact_posterior.max() < 0.01
    assert "impact_posterior" in pd.read_csv(tmp_path / "out" / "stats.csv").columns
    with pytest.raises(InputError, match="at least 3 perturbations"):
        impact_mixture(res.head(2).reset_index())
