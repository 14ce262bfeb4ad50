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


def test_the_command_line_starts_without_torch_transformers_or_ray():
    """Every command's flags come from its config class; building the parser (what `--help`,
    `corpus stats` or `perturb stats` pay before their work) must not load the model stack."""
    code = (
        "import sys; from rankformer.cli import _parser; _parser();"
        "print([m for m in ('torch', 'transformers', 'ray', 'mlflow') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_job_manifests_name_real_entrypoints_and_valid_configs():
    """Every RayJob's entrypoint scripts exist, and each config it mounts builds into the config
    class of the command the script runs (unknown keys and wrong types would fail here)."""
    import re

    import yaml

    from rankformer.cli_config import build
    from rankformer.config import TokenizeConfig, VocabBuildConfig
    from rankformer.train.config import FinetuneCellsConfig, FinetuneGenesConfig, PretrainConfig

    classes = {
        "build_vocab.py": VocabBuildConfig,
        "tokenize_corpus.py": TokenizeConfig,
        "pretrain.py": PretrainConfig,
        "finetune_genes.py": FinetuneGenesConfig,
        "finetune_cells.py": FinetuneCellsConfig,
    }
    manifests = sorted((REPO / "deploy" / "kuberay").glob("rayjob-*.yaml"))
    assert manifests
    for path in manifests:
        docs = list(yaml.safe_load_all(path.read_text()))
        job = next(d for d in docs if d["kind"] == "RayJob")
        files = {k: v for d in docs if d["kind"] == "ConfigMap" for k, v in d["data"].items()}
        for script, config in re.findall(
            r"python (jobs/\S+\.py) --config /config/(\S+)", job["spec"]["entrypoint"]
        ):
            assert (REPO / script).exists(), (path.name, script)
            build(classes[script.split("/")[-1]], yaml.safe_load(files[config]))


def test_serve_configs_name_the_real_application_and_valid_options():
    import importlib

    import yaml

    from rankformer.cli_config import build
    from rankformer.serving import DEPLOYMENT, ServeConfig

    serve_file = yaml.safe_load((REPO / "deploy" / "serve" / "serve.yaml").read_text())
    service = yaml.safe_load((REPO / "deploy" / "kuberay" / "rayservice.yaml").read_text())
    for doc in (serve_file, yaml.safe_load(service["spec"]["serveConfigV2"])):
        assert doc["proxy_location"] == "HeadOnly"
        for app in doc["applications"]:
            module, attr = app["import_path"].split(":")
            assert callable(getattr(importlib.import_module(module), attr))
            cfg = build(ServeConfig, app["args"])
            # the model reloads in place through the deployment's user_config
            (dep,) = app["deployments"]
            assert dep["name"] == DEPLOYMENT and set(dep["user_config"]) == {"model", "revision"}
            assert dep["user_config"]["model"] == cfg.model


def test_serve_build_accepts_the_application(tmp_path):
    import yaml

    env = {**__import__("os").environ, "RAY_AUTH_MODE": "disabled", "RANKFORMER_MODEL": "models:/m@current"}
    serve_bin = (
        str(REPO / ".venv" / "bin" / "serve") if (REPO / ".venv" / "bin" / "serve").exists() else "serve"
    )
    out = tmp_path / "built.yaml"
    subprocess.run(
        [serve_bin, "build", "rankformer.serving_app:app", "-o", str(out)],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
        timeout=180,
    )
    app = yaml.safe_load(out.read_text())["applications"][0]
    deployments = {d["name"]: d for d in app["deployments"]}
    assert set(deployments) == {"RankformerServer"}
    assert deployments["RankformerServer"]["user_config"]["model"] == "models:/m@current"
    assert deployments["RankformerServer"]["autoscaling_config"]["max_replicas"] == 2
