"""Repository invariants."""

import subprocess
import sys
from pathlib import Path

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
        "import sys; import rankformer.corpus.kernels, rankformer.vocab.gene_vocab, rankformer.io.sources;"
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

    from rankformer.config.corpus import TokenizeConfig, VocabBuildConfig
    from rankformer.config.flags import build
    from rankformer.config.train import FinetuneCellsConfig, FinetuneGenesConfig, PretrainConfig

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

    from rankformer.config.flags import build
    from rankformer.config.serve import ServeConfig
    from rankformer.serve.app import DEPLOYMENT

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
    # optional JSON logs: Serve's own logging config takes the encoding
    from ray.serve.schema import LoggingConfig

    from rankformer.serve.app import serve_logging

    logs = serve_logging(ServeConfig(model="m", json_logs=True))
    assert LoggingConfig(**logs).encoding == "JSON"
    assert LoggingConfig(**serve_logging(ServeConfig(model="m"))).encoding == "TEXT"


def test_serve_build_accepts_the_application(tmp_path):
    import yaml

    env = {
        **__import__("os").environ,
        "RAY_AUTH_MODE": "disabled",
        "RANKFORMER_MODEL": "models:/m@current",
        "RANKFORMER_API_KEY": "key-of-the-build-machine",  # replicas read their own, at start
    }
    serve_bin = str(Path(sys.executable).with_name("serve"))  # the environment running the tests
    out = tmp_path / "built.yaml"
    subprocess.run(
        [serve_bin, "build", "rankformer.serve.bound:app", "-o", str(out)],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
        timeout=180,
    )
    assert "key-of-the-build-machine" not in out.read_text()
    app = yaml.safe_load(out.read_text())["applications"][0]
    deployments = {d["name"]: d for d in app["deployments"]}
    assert set(deployments) == {"RankformerServer"}
    assert deployments["RankformerServer"]["user_config"]["model"] == "models:/m@current"
    assert deployments["RankformerServer"]["autoscaling_config"]["max_replicas"] == 2


def test_the_gpu_check_needs_nothing_the_gpu_image_lacks(tmp_path):
    """`benchmarks/gpu_check.sh` (and `cpu_check.sh`, the CPU perturbation benchmark on the same
    machine's host) runs on the lent GPU machines' stock Python (torch, transformers,
    pyarrow, pandas, scipy, h5py, numba, pytest; no Ray, MLflow, anndata, s3fs, pydantic, PEFT
    or accelerate): its
    benchmarks import, and an in-process perturbation and embedding run, and the benchmark's loader
    of the job's model, with those blocked."""
    code = f"""
import sys
BLOCK = {{"ray", "mlflow", "anndata", "s3fs", "umap", "boto3", "pydantic", "fastapi", "tdigest",
          "accelerate", "peft", "zarr", "jsonargparse"}}
for name in BLOCK:  # absent as Python sees it: importing fails, importlib.util.find_spec says None
    sys.modules[name] = None
sys.path[:0] = ["{REPO / "tests"}", "{REPO / "benchmarks"}"]
import numpy as np
import bench_perturb, bench_pretrain_gpu  # noqa: F401
from transformers import BertForMaskedLM
from pretrain_helpers import write_corpus
from rankformer.embed.cells import EmbedConfig, read_embeddings, run_embed
from rankformer.model.presets import bert_config, preset
from rankformer.model.store import save_model_dir
from rankformer.perturb.job import PerturbConfig, read_results, run_perturb
from rankformer.vocab.gene_vocab import GeneVocab
from rankformer.classify.genes import token_probs  # noqa: F401  (the GPU sync test's predictions)
from rankformer.train.finetune import cell_probs  # noqa: F401
cells = [np.asarray([2, *range(4 + k, 12 + k), 3]) for k in range(6)]
corpus = write_corpus("{tmp_path}/c", cells, 20, carry={{"state": ["A", "B"] * 3}})
vocab = GeneVocab.load("{tmp_path}/c_vocab.json")
save_model_dir(BertForMaskedLM(bert_config(preset("tiny"), vocab)), vocab,
               {{"task": "masked-lm", "layout": "v2", "max_length": 64}}, "{tmp_path}/m")
common = dict(model="{tmp_path}/m", corpus=corpus, in_process=True)
run_perturb(PerturbConfig(**common, out="{tmp_path}/p", mode="all", state_column="state", goal_state="A"))
run_embed(EmbedConfig(**common, out="{tmp_path}/e"))
from rankformer.perturb.perturber import Perturber  # (bench_perturb.budget_of's loader, on the GPU)
Perturber.on_demand("{tmp_path}/m", "", False, "bfloat16", "penultimate")
print(read_results("{tmp_path}/p").num_rows, read_embeddings("{tmp_path}/e").num_rows, flush=True)
import os
os._exit(0)  # past the checks: Arrow's thread pools can abort a process's teardown (apache/arrow#34314)
"""
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert got.returncode == 0, got.stderr[-3000:]
    assert got.stdout.split()[-2:] == ["48", "6"]  # every gene of each of the 6 cells deleted; 6 cells


def _pod_templates(doc: dict) -> list[tuple[str, dict, dict]]:
    """(group, group spec, pod spec) of each head and worker group of a RayCluster, RayJob or
    RayService."""
    spec = doc["spec"]
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
    groups = [("head", cluster["headGroupSpec"])]
    groups += [(g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])]
    return [(name, g, g["template"]["spec"]) for name, g in groups]


def test_cluster_manifests_scale_reserve_tolerate_and_name_the_registry_images():
    """Every Ray cluster autoscales in-tree between its groups' min and max; head pods request
    what they use; GPU pods tolerate the GPU taint; every container image is one of the two the
    kustomization points at the registry (so one `kustomize edit set image` moves them all); the
    serving replicas get the API key from a Secret in their own pods."""
    import yaml

    kuberay = REPO / "deploy" / "kuberay"
    kustom = yaml.safe_load((kuberay / "kustomization.yaml").read_text())
    images = {i["name"] for i in kustom["images"]}
    assert images == {"rankformer", "rankformer-cuda"} and all("/" in i["newName"] for i in kustom["images"])
    config = yaml.safe_load((kuberay / "kustomizeconfig.yaml").read_text())
    kinds = {c["kind"] for c in config["images"]}
    seen = set()
    for name in kustom["resources"]:
        for doc in yaml.safe_load_all((kuberay / name).read_text()):
            if doc["kind"] not in ("RayCluster", "RayJob", "RayService"):
                continue
            assert doc["kind"] in kinds
            cluster = doc["spec"].get("rayClusterSpec") or doc["spec"].get("rayClusterConfig") or doc["spec"]
            assert cluster.get("enableInTreeAutoscaling") is True, name
            for group, g, pod in _pod_templates(doc):
                (container,) = pod["containers"]
                assert container["image"] in images, (name, group)
                seen.add(container["image"])
                resources = container.get("resources", {})
                assert resources.get("requests"), (name, group, "no resource requests")
                if group != "head":
                    assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], (name, group)
                if "nvidia.com/gpu" in resources.get("limits", {}):
                    assert any(t["key"] == "nvidia.com/gpu" for t in pod.get("tolerations", [])), (
                        name,
                        group,
                    )
            if doc["kind"] == "RayService":
                for group, _, pod in _pod_templates(doc):
                    env = {e["name"]: e for e in pod["containers"][0].get("env", [])}
                    assert env["RANKFORMER_API_KEY"]["valueFrom"]["secretKeyRef"]["name"], group
    assert seen == images


def test_images_install_the_lock_before_the_source():
    """The Dockerfile installs every dependency from uv.lock in a layer that copies nothing but
    the project metadata and the lock (a code edit does not reinstall torch), then the source; the
    lock holds every dependency pyproject.toml declares, at the torch the tests run on."""
    import re
    import tomllib

    lines = (REPO / "deploy" / "Dockerfile").read_text().splitlines()
    copies = [i for i, line in enumerate(lines) if line.startswith("COPY")]
    first = lines[copies[0]]
    assert "uv.lock" in first and "platform" not in first
    lock_install = next(i for i, line in enumerate(lines) if "uv export --frozen" in line)
    source = next(i for i, line in enumerate(lines) if line.startswith("COPY platform"))
    assert copies[0] < lock_install < source
    assert any("--no-deps" in line for line in lines[source:])
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    locked = {p["name"]: p for p in lock["package"]}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = [re.split(r"[<>=\[ ;]", d, maxsplit=1)[0].lower() for d in project["dependencies"]]
    assert not [d for d in declared if d not in locked], "uv.lock is stale: run `uv lock`"
    make = (REPO / "Makefile").read_text()
    tested = re.search(r"TORCH_VERSION \?= (\S+)", make).group(1)
    assert locked["torch"]["version"] == tested
