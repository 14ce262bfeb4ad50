"""The package's shape: the stage order and the no-cycle rule hold, and each check fails when
broken (on a copy of the package with one import added); old names that saved models and
deployments carry still resolve."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint_imports(package_root: Path) -> subprocess.CompletedProcess[str]:
    """import-linter with the repository's contracts, on the package under ``package_root``."""
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(REPO / "pyproject.toml"), "--no-cache"],
        cwd=package_root,
        env={"PYTHONPATH": str(package_root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def _copy_with(tmp_path: Path, module: str, line: str) -> Path:
    root = tmp_path / "src"
    shutil.copytree(REPO / "platform" / "rankformer", root / "rankformer")
    target = root / "rankformer" / module
    target.write_text(target.read_text() + f"\n{line}\n")
    return root


def test_the_package_keeps_its_contracts(tmp_path):
    root = tmp_path / "src"
    shutil.copytree(REPO / "platform" / "rankformer", root / "rankformer")
    done = _lint_imports(root)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Contracts: 2 kept, 0 broken." in done.stdout


def test_an_upward_import_breaks_the_stage_order(tmp_path):
    """The model stage reaching up into serving (a later stage) fails `make lint`."""
    done = _lint_imports(_copy_with(tmp_path, "model/masking.py", "import rankformer.serve.app  # noqa"))
    assert done.returncode != 0
    assert "rankformer.model is not allowed to import rankformer.serve" in done.stdout


def test_a_cycle_inside_a_stage_is_refused(tmp_path):
    """corpus/tokenize reads finished corpora through corpus/read; read importing tokenize back
    makes a cycle inside the corpus stage."""
    done = _lint_imports(_copy_with(tmp_path, "corpus/read.py", "import rankformer.corpus.tokenize  # noqa"))
    assert done.returncode != 0
    assert "No cycles are allowed in rankformer.corpus" in done.stdout


def test_each_stage_lives_where_its_name_says():
    pkg = REPO / "platform" / "rankformer"
    stages = ("corpus/tokenize.py", "train/pretrain.py", "classify/genes.py", "perturb/job.py", "serve")
    for path in stages:
        assert (pkg / path).exists(), path
    for old in ("embed.py", "perturber.py", "serving.py", "infer.py", "inference.py", "infer_config.py"):
        assert not (pkg / old).exists(), old


def test_models_saved_with_the_old_head_path_still_load_their_head():
    pytest.importorskip("torch")
    from rankformer.model.heads import MeanPoolForSequenceClassification
    from rankformer.train.classifier import classifier_class

    old = classifier_class("sequence", "rankformer.heads:MeanPoolForSequenceClassification")
    assert old is MeanPoolForSequenceClassification
    assert classifier_class("sequence", "rankformer.model.heads:MeanPoolForSequenceClassification") is old


def test_choices_come_from_the_types(capsys):
    from rankformer.cli import main
    from rankformer.config.infer import EmbedConfig
    from rankformer.errors import InputError

    with pytest.raises(SystemExit):
        main(["embed", "--help"])
    shown = capsys.readouterr().out
    assert "--level {cell,gene}" in shown and "--pooling {mean,cls}" in shown
    with pytest.raises(InputError, match=r"pooling 'max' must be mean or cls"):
        EmbedConfig(model="m", corpus="c", out="o", pooling="max")  # type: ignore[arg-type]
