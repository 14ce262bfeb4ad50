"""Repository invariants."""

import subprocess
import sys

from conftest import REPO


def test_platform_source_root_does_not_shadow_the_stdlib():
    assert not (REPO / "platform" / "__init__.py").exists()
    code = "import platform, sys; print(platform.__file__); print(platform.python_version())"
    for cwd in (REPO, REPO / "platform"):
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.splitlines()
        assert "rankformer" not in out[0] and out[0].endswith("platform.py")
        assert out[1] == ".".join(map(str, sys.version_info[:3]))


def test_science_modules_do_not_import_ray():
    code = (
        "import sys; import rankformer.corpus.kernels, rankformer.vocab, rankformer.io.sources;"
        "print('ray' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
