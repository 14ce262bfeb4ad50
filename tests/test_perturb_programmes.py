"""The last two perturbation statistics on a model pretrained on a planted gene programme: in
state A cells a driver gene is followed by its five target genes, a block at a random rank among
shared genes (state B cells hold neither). Deleting the driver moves its targets' states most
(`perturb stats --by affected-gene`), and the mixture model (`--mixture`) puts exactly the
programme's genes in the impactful component."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from pretrain_helpers import pretrain_in_process, write_corpus
from rankformer.cli import main as cli
from rankformer.config.infer import PerturbConfig
from rankformer.io.synth import gene_ids
from rankformer.perturb.job import run_perturb

N_SHARED, N_TARGETS = 30, 5
DRIVER = N_SHARED  # gene index (symbol G30); its targets are G31..G35


def _cells(n: int, seed: int) -> tuple[list[np.ndarray], list[str]]:
    """Shared genes in one ranked order (a few adjacent swaps, the tail cut at random); every
    other cell (state A) also holds the driver and, right after it, its targets in fixed order."""
    rng = np.random.default_rng(seed)
    programme = list(range(4 + N_SHARED, 4 + N_SHARED + 1 + N_TARGETS))  # tokens: driver, targets
    cells, states = [], []
    for i in range(n):
        body = list(range(4, 4 + N_SHARED))
        for j in rng.integers(0, N_SHARED - 1, 4):
            body[j], body[j + 1] = body[j + 1], body[j]
        body = body[: int(rng.integers(20, N_SHARED + 1))]
        state = "A" if i % 2 == 0 else "B"
        if state == "A":
            at = int(rng.integers(0, len(body) + 1))
            body = body[:at] + programme + body[at:]
        cells.append(np.asarray([2, *body, 3], dtype=np.int32))
        states.append(state)
    return cells, states


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("programmes")
    cells, states = _cells(400, 0)
    n_genes = N_SHARED + 1 + N_TARGETS
    corpus = write_corpus(str(d / "corpus"), cells, n_genes, shards=2, carry={"state": states}, symbols=True)
    model = pretrain_in_process(corpus, str(d / "model"), 800)
    small = write_corpus(
        str(d / "small"), cells[:80], n_genes, shards=2, carry={"state": states[:80]}, symbols=True
    )
    out = d / "ko"
    run_perturb(
        PerturbConfig(
            model=model,
            corpus=small,
            out=str(out),
            mode="all",
            per_gene=True,
            state_column="state",
            start_state="A",
            goal_state="B",
            cells_where=[],
            in_process=True,
        )
    )
    return SimpleNamespace(d=d, small=small, model=model, out=out, ids=gene_ids(n_genes))


PROGRAMME = [f"G{i}" for i in range(DRIVER, DRIVER + 1 + N_TARGETS)]


def test_deleting_the_driver_moves_its_targets_most(world, capsys):
    assert cli(["perturb", "stats", str(world.out), "--by", "affected-gene", "--top", "0"]) == 0
    table = pd.read_csv(world.out / "affected.csv")
    driver = table[table.perturbed_symbol == f"G{DRIVER}"]
    assert sorted(driver.affected_symbol.head(N_TARGETS)) == PROGRAMME[1:]
    assert (driver.n_cells.head(N_TARGETS) == 40).all()  # every state A cell
    # their lowest mean shift clears the shared genes' highest by more than either's interval
    targets, shared = driver.head(N_TARGETS), driver.iloc[N_TARGETS:]
    assert targets.shift_ci_low.min() > shared.shift_mean.max()
    # deleting a shared gene moves no target more than the genes around it: the targets are not
    # simply the genes that move most under any deletion
    other = table[table.perturbed_symbol == "G3"]
    assert set(other.affected_symbol.head(N_TARGETS)) != set(PROGRAMME[1:])


def test_the_mixture_model_finds_the_programme(world, capsys):
    assert cli(["perturb", "stats", str(world.out), "--goal-state", "B", "--mixture"]) == 0
    said = capsys.readouterr().out
    stats = pd.read_csv(world.out / "stats.csv").set_index("symbol")
    assert sorted(stats.index[stats.impactful]) == PROGRAMME
    assert stats.loc[PROGRAMME, "impact_posterior"].min() > 0.5
    assert stats.drop(index=PROGRAMME).impact_posterior.max() < 0.5
    assert f"{len(PROGRAMME)} impactful by the mixture model" in said


def test_in_memory_affected_genes_equal_the_jobs(world):
    """model.perturb(..., per_gene=True) then model.affected_genes: the job's table."""
    import rankformer
    from rankformer.corpus.read import read_corpus

    model = rankformer.load_model(world.model)
    cells = read_corpus(world.small, engine="arrow").to_table()
    a_cells = cells.filter(pd.Series(cells.column("state").to_pylist()).eq("A").to_numpy())
    _, gene_rows = model.perturb(a_cells, [str(world.ids[DRIVER])], per_gene=True)
    got = model.affected_genes(gene_rows, top=N_TARGETS)
    from rankformer.perturb.affected import affected_stats

    job = affected_stats(str(world.out), top=0, write=False)
    want = job[job.perturbed == str(world.ids[DRIVER])].head(N_TARGETS)
    assert got.affected_symbol.tolist() == want.affected_symbol.tolist()
    assert sorted(got.affected_symbol) == PROGRAMME[1:]
    np.testing.assert_allclose(got.shift_mean, want.shift_mean, atol=1e-6)
