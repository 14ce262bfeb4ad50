"""The controls beside every classification answer: rank statistics, log-normalised counts, and
the verdict that says when a model does not beat them."""

import json

import numpy as np
import pytest
import scipy.sparse as sp

from conftest import needs_shared
from pretrain_helpers import pbmc_with_untrained_model
from rankformer.classify.controls import lognorm_counts, rank_statistics, verdict


def test_rank_statistics_by_hand():
    # tokens < 2 are specials; gene 5 is first in both cells, gene 7 last of three, gene 9 absent
    cells = [np.array([0, 5, 6, 7, 1]), np.array([5, 7])]
    stats = rank_statistics(cells, 10, gene_lo=2)
    np.testing.assert_allclose(stats[5], [0.0, 1.0])
    np.testing.assert_allclose(stats[6], [0.5, 0.5])
    np.testing.assert_allclose(stats[7], [1.0, 1.0])
    np.testing.assert_allclose(stats[9], [1.0, 0.0])  # never seen: last, in no cell


def test_verdict_says_when_a_model_does_not_beat_a_control():
    ok, text = verdict("the fine-tuned model", 0.95, {"rank statistics alone": 0.6, "shuffled": 0.5}, "AUC")
    assert ok and "beats its controls" in text and "0.600" in text
    ok, text = verdict("the fine-tuned model", 0.95, {"rank statistics alone": 0.97, "shuffled": 0.5}, "AUC")
    assert not ok and text.startswith("WARNING") and "rank statistics alone 0.970" in text
    assert "shuffled" not in text.split("(")[0]  # only the control it did not beat is named
    ok, _ = verdict("m", 0.61, {"c": 0.6}, "AUC")  # within the margin: not beaten
    assert not ok


def test_lognorm_counts_per_10k():
    x = sp.csr_matrix(np.array([[1.0, 3.0, 0.0], [0.0, 0.0, 5.0]]))
    got = lognorm_counts(x).toarray()
    np.testing.assert_allclose(got, np.log1p(np.array([[2500.0, 7500.0, 0.0], [0.0, 0.0, 10000.0]])))


@needs_shared()
@pytest.mark.slow
def test_an_untrained_cell_classifier_is_flagged_beside_log_normalised_counts(
    tmp_path, geneformer_v2_vocab, shared, capsys
):
    """Real PBMC cells, an untrained model fine-tuned for 3 steps: the log-normalised-counts baseline
    (read back from the source file by source_file/source_row) separates the three cell types, and
    the report says plainly that the fine-tuned model does not beat it."""
    from rankformer.classify.cells import run_finetune_cells
    from rankformer.config.train import FinetuneCellsConfig

    corpus, model = pbmc_with_untrained_model(str(tmp_path), str(shared), geneformer_v2_vocab)
    summary = run_finetune_cells(
        FinetuneCellsConfig(
            corpus=corpus,
            model=model,
            out=str(tmp_path / "out"),
            limit_cells=400,
            max_steps=3,
            frozen_baseline=False,
            batch={"max_tokens": 8192, "max_cells": 8},
            track={"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"},
        )
    )
    assert summary["lognorm_counts"]["test_macro_f1"] > 0.8, summary["lognorm_counts"]
    assert summary["majority_class"]["test_accuracy"] < 0.7
    assert not summary["beats_controls"] and summary["verdict"].startswith("WARNING")
    out = capsys.readouterr().out
    assert "log-normalised counts" in out and "WARNING: the fine-tuned model does not beat" in out
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert report["verdict"] == summary["verdict"]
