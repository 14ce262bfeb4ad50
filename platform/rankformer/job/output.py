"""A job's output folder: claimed at the start, files published atomically, the manifest written
last; and the MLflow parent run a job's results are logged under."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np
import pandas as pd

from rankformer.errors import InputError
from rankformer.io import fs


def in_parent_run(
    job: str, cfg: Any, uri: str, vocab_hash: str, body: Callable[[str], dict[str, Any]]
) -> dict[str, Any]:
    """Run ``body(parent_run_id)`` inside the job's MLflow parent run (named ``--run-name``, else
    after the job and its output folder; the config logged as parameters), which ends FAILED if
    ``body`` raises."""
    from rankformer import tracking

    name = cfg.track.run_name or f"{job}-{os.path.basename(cfg.out.rstrip('/'))}"
    parent = tracking.start_run(uri, cfg.track.experiment, name, {"job": job, "vocab_hash": vocab_hash})
    try:
        tracking.log_params(uri, parent, asdict(cfg))
        summary = body(parent)
    except BaseException:
        tracking.end_run(uri, parent, "FAILED")
        raise
    tracking.end_run(uri, parent)
    return summary


JOB_FILE = "job.json"  # written first: which job owns this folder, with which config


MANIFEST = "manifest.json"  # written last: the outputs of a finished job


def fingerprint(cfg: Any) -> str:
    """A short hash of a config (a dataclass, or a dict of what matters)."""
    blob = json.dumps(cfg if isinstance(cfg, dict) else asdict(cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class JobOutput:
    """The output folder of a job: claimed at the start (refusing a folder holding anything else),
    files staged locally and published one by one atomically, the manifest last. A rerun with the
    same config keeps the training checkpoints in ``.work`` and resumes."""

    def __init__(self, out: str, job: str, cfg: Any, keep_on_change: bool = True) -> None:
        """``keep_on_change``: a rerun with other options starts over (training checkpoints are
        dropped); when False such a rerun is refused (its finished shards would mix in)."""
        self.out, self.job, self.keep_on_change = out, job, keep_on_change
        self.fingerprint = fingerprint(cfg)
        self.stage = tempfile.mkdtemp(prefix=f"rankformer-{job}-")
        # removed when the job finishes, and also when it fails (once this object is dropped, or at exit)
        self._drop_stage = weakref.finalize(self, shutil.rmtree, self.stage, True)
        self.files: list[str] = []
        self._claim()

    def _claim(self) -> None:
        claim, produced = fs.folder_claim(self.out, JOB_FILE, "job output")
        if claim is not None:
            if claim.get("job") != self.job:
                raise InputError(
                    f"output {self.out} holds the output of `{claim.get('job')}`, not `{self.job}`; choose "
                    "a new --out folder"
                )
            changed = claim.get("fingerprint") != self.fingerprint
            if changed and not self.keep_on_change and produced:  # only the claim: a run wrote nothing
                raise InputError(
                    f"output {self.out} holds `{self.job}` output made with other options; choose a new "
                    "--out folder, or delete that one to start over"
                )
            if changed and not fs.is_remote(self.out):  # other options: start over
                shutil.rmtree(os.path.join(self.out, ".work"), ignore_errors=True)
        fs.write_claim(self.out, JOB_FILE, {"job": self.job, "fingerprint": self.fingerprint})

    def path(self, name: str) -> str:
        """A local path to write ``name`` to before :meth:`publish`."""
        p = os.path.join(self.stage, name)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        return p

    def write_json(self, name: str, doc: Any) -> None:
        with open(self.path(name), "w") as f:
            json.dump(doc, f, indent=1, default=_jsonable)
        self.publish(name)

    def write_table(self, stem: str, df: pd.DataFrame) -> None:
        """``stem``.parquet and ``stem``.csv."""
        df.to_parquet(self.path(stem + ".parquet"), index=False)
        df.to_csv(self.path(stem + ".csv"), index=False)
        self.publish(stem + ".parquet")
        self.publish(stem + ".csv")

    def publish(self, name: str) -> None:
        fs.copy(os.path.join(self.stage, name), fs.join(self.out, name))
        self.files.append(name)

    def log_to(self, uri: str, run_id: str) -> None:
        """Every published file as an artifact of the MLflow run (under results/)."""
        from rankformer import tracking

        for name in sorted(set(self.files)):
            tracking.log_file(uri, run_id, os.path.join(self.stage, name), "results")

    def save_model(
        self, model: Any, vocab: Any, meta: dict[str, Any], uri: str, run_id: str, track: Any
    ) -> str | None:
        """The fine-tuned model directory at ``out/model``, logged to the run and, when the job
        names one, registered (tags: task, classes, vocab hash); returns the registry version."""
        from rankformer import tracking
        from rankformer.model.store import save_model_dir

        local = self.path("model")
        save_model_dir(model, vocab, meta, local)
        save_model_dir(model, vocab, meta, fs.join(self.out, "model"))
        tracking.log_artifacts(uri, run_id, local, "model")
        if not track.registered_model:
            return None
        tags = {"vocab_hash": vocab.content_hash, "task": meta["task"], "classes": ",".join(meta["classes"])}
        return tracking.register_model(uri, run_id, "model", track.registered_model, track.alias, tags)

    def finish(self, summary: dict[str, Any]) -> None:
        doc = {"job": self.job, "fingerprint": self.fingerprint, "files": sorted(set(self.files)), **summary}
        fs.write_bytes_atomic(
            fs.join(self.out, MANIFEST), json.dumps(doc, indent=1, default=_jsonable).encode()
        )
        self._drop_stage()


def finished_output(out: str, *jobs: str) -> dict[str, Any]:
    """The manifest of the finished output at ``out`` of one of ``jobs``; a named error when there
    is none (never run, still running, or failed) or when it is another job's."""
    command = jobs[0].split("-")[0]  # embed-cell, embed-gene: `rankformer embed`
    uri = fs.join(out, MANIFEST)
    if not fs.exists(uri):
        why = (
            "its job has not finished (it is running, or it failed: rerun it to resume)"
            if fs.exists(fs.join(out, JOB_FILE))
            else f"no rankformer job wrote there; run `rankformer {command} --out {out}` first"
        )
        raise InputError(f"{out} holds no finished `{command}` output: {why}")
    manifest: dict[str, Any] = fs.read_json(uri, f"rerun `rankformer {command}`")
    if manifest.get("job") not in jobs:
        raise InputError(
            f"{out} holds the output of `{manifest.get('job')}`, not of `{command}`; pass the folder that "
            "job wrote"
        )
    return manifest


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def table_bytes(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()
