"""The CLI end to end and `ray job submit` of jobs/ on the local two-raylet cluster."""

import json
import sys
import time

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import REPO
from rankformer.cli import main
from rankformer.corpus.read import corpus_files
from rankformer.io.synth import SynthSpec, write_h5ad

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    d = tmp_path_factory.mktemp("jobs")
    path = str(d / "cells.h5ad")
    write_h5ad(path, SynthSpec(n_cells=120, n_genes=60, genes_per_cell=25, seed=11), chunk_rows=50)
    return d, path


def test_cli_vocab_build_then_tokenize(ray_cluster, raw, capsys):
    d, path = raw
    assert (
        main(
            [
                "vocab",
                "build",
                path,
                "--out",
                str(d / "cli_vocab.json"),
                "--rows-per-shard",
                "50",
                "--min-cells",
                "2",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "tokenize",
                path,
                "--vocab",
                str(d / "cli_vocab.json"),
                "--out",
                str(d / "cli_corpus"),
                "--layout",
                "v1",
                "--max-length",
                "16",
                "--carry",
                "cell_type:celltype",
                "--rows-per-shard",
                "50",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "vocabulary of" in out and "tokenized 120 of 120 cells" in out
    t = pq.read_table(corpus_files(str(d / "cli_corpus")))
    assert t.num_rows == 120 and max(t["length"].to_pylist()) == 16
    assert t.column_names[-1] == "celltype"


def test_cli_reports_input_errors_with_exit_code_2(raw, capsys, tmp_path):
    _, path = raw
    code = main(["tokenize", path, "--vocab", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "missing.json not found" in capsys.readouterr().err


def _submit(ray_cluster, entrypoint: str) -> str:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(ray_cluster["dashboard"])
    deadline = time.time() + 120
    while True:  # the agent registered (the fixture waited for it); its HTTP side may lag a moment
        try:
            job = client.submit_job(entrypoint=entrypoint)
            break
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.time() > deadline:
                raise
            time.sleep(2)
    deadline = time.time() + 300
    while time.time() < deadline:
        status = client.get_job_status(job)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(1)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs
    return logs


def test_ray_job_submit_of_both_jobs(ray_cluster, raw):
    d, path = raw
    vocab_cfg = d / "vocab.yaml"
    vocab_cfg.write_text(
        yaml.safe_dump({"inputs": [path], "out": str(d / "job_vocab.json"), "read": {"rows_per_shard": 60}})
    )
    logs = _submit(ray_cluster, f"{sys.executable} {REPO}/jobs/build_vocab.py --config {vocab_cfg}")
    assert "vocabulary of" in logs
    tok_cfg = d / "tokenize.yaml"
    tok_cfg.write_text(
        yaml.safe_dump(
            {
                "inputs": [path],
                "vocab": str(d / "job_vocab.json"),
                "out": str(d / "job_corpus"),
                "carry": {"cell_type": "celltype"},
                "read": {"rows_per_shard": 40},
            }
        )
    )
    logs = _submit(
        ray_cluster, f"{sys.executable} {REPO}/jobs/tokenize_corpus.py --config {tok_cfg} --max-length 64"
    )
    assert "tokenized 120 of 120 cells" in logs
    manifest = json.loads((d / "job_corpus" / "manifest.json").read_text())
    assert manifest["config"]["max_length"] == 64 and len(manifest["shards"]) == 3
