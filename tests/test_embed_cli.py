"""`bitray demo` end to end (tiny model), the example config and the Ray job entrypoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from bitray.cli import main
from bitray.config import EmbedConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_example_config_is_valid_and_flags_override_it():
    example = ROOT / "pipelines/configs/embed.yaml"
    config = load_config(EmbedConfig, example, {"batch_size": 3, "run_id": "r1"})
    assert config.inputs == ["s3://my-bucket/photos/"] and config.model == "bit-s-r101x1"
    assert (config.batch_size, config.run_id, config.size_hw()) == (3, "r1", (224, 224))


def test_defaults_need_no_config():
    config = EmbedConfig()
    assert config.output == "./bitray-output/embeddings" and config.gpus_per_actor is None


def test_job_entrypoint_takes_the_embed_flags():
    result = subprocess.run([sys.executable, str(ROOT / "pipelines/embed.py"), "--help"],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0
    assert "--incremental" in result.stdout and "--run-id" in result.stdout


@pytest.mark.slow
def test_demo_embeds_sample_photos(ray_local, tmp_path, capsys):
    code = main(["demo", "--output", str(tmp_path / "demo"), "--model", "random:tiny", "--image-size", "32"])
    out = capsys.readouterr().out
    assert code == 0
    photos = sorted((tmp_path / "demo" / "photos").iterdir())
    assert len(photos) >= 10
    emb = pd.read_parquet(tmp_path / "demo" / "output" / "embeddings")
    assert sorted(emb.path) == [str(p) for p in photos]
    assert f"embeddings in {tmp_path / 'demo' / 'output'}/embeddings/" in out
    assert f'"embedded": {len(photos)}' in out
    assert "RANDOM WEIGHTS (bit-tiny@random-init)" in out  # a random-weights run says so, loudly


def test_inputs_from_prefixes_and_a_manifest_file_once_each(tmp_path):
    from bitray.embed.manifest import listed_inputs

    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    for name in ("a.jpg", "b.PNG", "sub/c.webp", "notes.txt"):
        (photos / name).write_bytes(b"x")
    listing = tmp_path / "list.txt"
    listing.write_text(f"# today's images\n{photos / 'a.jpg'}\n\n{photos / 'sub'}\n")
    config = EmbedConfig(inputs=[str(photos)], manifest=str(listing))
    found = [obj.uri for obj in listed_inputs(config, config.storage)]
    assert found == sorted(str(photos / n) for n in ("a.jpg", "b.PNG", "sub/c.webp"))  # once each, in order
