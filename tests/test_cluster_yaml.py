"""``cluster.yaml`` passes Ray's own launcher validation offline, and a broken copy does not."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parent.parent / "cluster.yaml"


def load() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text(encoding="utf-8"))


def validated(config: dict) -> dict:
    """What `ray up` does before any cloud call: fill in the provider's defaults, then validate."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_ray_validation():
    prepared = validated(load())
    nodes = prepared["available_node_types"]
    head = nodes[prepared["head_node_type"]]
    gpu = nodes["ray.worker.gpu"]
    assert head["node_config"]["InstanceType"].startswith("m")  # a CPU head
    assert gpu["node_config"]["InstanceType"].startswith("g") and gpu["min_workers"] == 0
    assert prepared["docker"]["image"] == "rayproject/ray:2.60.0-py311-gpu"
    assert any("[gpu]" in command for command in prepared["setup_commands"])
    assert "IamInstanceProfile" in gpu["node_config"]
    assert prepared["idle_timeout_minutes"] > 0


def test_image_matches_the_installed_ray():
    import ray

    assert load()["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")


def test_no_credentials_in_cluster_yaml():
    text = CLUSTER_YAML.read_text(encoding="utf-8")
    for secret in ("aws_access_key_id", "aws_secret_access_key", "AWS_SECRET", "AKIA"):
        assert secret.lower() not in text.lower()


def broken_copies():
    missing_node_config = load()
    del missing_node_config["available_node_types"]["ray.worker.gpu"]["node_config"]
    missing_provider = load()
    del missing_provider["provider"]
    wrong_type = load()
    wrong_type["available_node_types"]["ray.worker.gpu"]["min_workers"] = "zero"
    unknown_key = load()
    unknown_key["idle_timeout_minute"] = 5  # a typo: the schema forbids unknown top-level keys
    head_not_a_type = load()
    head_not_a_type["head_node_type"] = "ray.head.gpu"
    return [
        pytest.param(missing_node_config, id="worker-without-node_config"),
        pytest.param(missing_provider, id="missing-provider"),
        pytest.param(wrong_type, id="min_workers-not-an-integer"),
        pytest.param(unknown_key, id="unknown-key"),
        pytest.param(head_not_a_type, id="head-type-not-defined"),
    ]


@pytest.mark.parametrize("config", broken_copies())
def test_broken_copy_fails_validation(config):
    with pytest.raises((jsonschema.ValidationError, ValueError, KeyError)):
        validated(config)


def test_broken_copy_on_disk_fails(tmp_path):
    text = CLUSTER_YAML.read_text(encoding="utf-8").replace("max_workers: 4\n", "max_workers: four\n", 1)
    broken = tmp_path / "cluster.yaml"
    broken.write_text(text, encoding="utf-8")
    with pytest.raises(jsonschema.ValidationError, match="four"):
        validated(yaml.safe_load(broken.read_text(encoding="utf-8")))
    original = copy.deepcopy(load())
    assert validated(original)  # the untouched file still passes
