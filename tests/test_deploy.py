"""``deploy/``: the KubeRay manifests parse, and what they run is what bitray ships."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml
from croniter import croniter

from bitray.config import EmbedConfig

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def documents(name: str) -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all((DEPLOY / name).read_text(encoding="utf-8")) if d]
    assert all({"apiVersion", "kind", "metadata"} <= set(d) for d in docs)
    return {d["kind"]: d for d in docs}


def test_common_config_is_a_valid_incremental_embed_config():
    common = documents("common.yaml")
    config = EmbedConfig.model_validate(yaml.safe_load(common["ConfigMap"]["data"]["embed.yaml"]))
    assert config.incremental
    assert "eks.amazonaws.com/role-arn" in common["ServiceAccount"]["metadata"]["annotations"]


def test_raycronjob_runs_the_embed_pipeline_on_a_valid_schedule():
    cron = documents("raycronjob.yaml")["RayCronJob"]
    assert cron["apiVersion"] == "ray.io/v1"
    assert croniter.is_valid(cron["spec"]["schedule"])
    job = cron["spec"]["jobTemplate"]
    argv = shlex.split(job["entrypoint"])
    assert argv[:2] == ["python", "/home/ray/bitray/pipelines/embed.py"]
    assert (ROOT / "pipelines" / "embed.py").is_file()
    assert argv[argv.index("--config") + 1] == "/etc/bitray/embed.yaml"
    cluster = job["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    mounts = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert {"name": "config", "mountPath": "/etc/bitray"} in mounts
    gpu = cluster["workerGroupSpecs"][0]
    assert gpu["minReplicas"] == 0
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_cronjob_fallback_submits_with_bitray():
    docs = documents("cronjob-submit.yaml")
    assert docs["RayCluster"]["spec"]["rayVersion"] == ray.__version__
    cronjob = docs["CronJob"]["spec"]
    assert croniter.is_valid(cronjob["schedule"]) and cronjob["concurrencyPolicy"] == "Forbid"
    command = cronjob["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:3] == ["bitray", "submit", "embed"] and "--wait" in command
    from bitray.cli import build_parser

    args = build_parser().parse_args(command[1:])
    assert (
        args.pipeline == "embed"
        and args.address == f"http://{docs['RayCluster']['metadata']['name']}-head-svc:8265"
    )


@pytest.mark.parametrize("name", ["raycronjob.yaml", "cronjob-submit.yaml"])
def test_images_are_bitray_builds_of_the_pinned_ray(name):
    dockerfile = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray.__version__)}-py311-gpu$", dockerfile, re.M)
    images = set(re.findall(r"image: (\S+)", (DEPLOY / name).read_text(encoding="utf-8")))
    assert images == {"ghcr.io/YOUR_ORG/bitray:0.1.0"}
