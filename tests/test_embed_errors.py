"""Unusable inputs and outputs end a run at once, before any Ray work, with one clear message."""

from __future__ import annotations

import socket

import pytest

from bitray.cli import main
from bitray.config import EmbedConfig, StorageConfig
from bitray.embed import run_embedding
from bitray.embed.layout import output_layout
from bitray.errors import BitrayError
from bitray.locks import LockHeld, open_lock


def config(inputs: list[str], output: str, **kwargs) -> EmbedConfig:
    return EmbedConfig(inputs=inputs, output=output, model="random:tiny", image_size=32, **kwargs)


def no_ray_work(monkeypatch) -> None:
    """Fail the test if the run gets as far as starting the Ray pipeline."""

    def refuse(*args, **kwargs):
        raise AssertionError("the run started Ray work")

    monkeypatch.setattr("bitray.embed.pipeline.run_pipeline", refuse)


def test_missing_bucket(s3_server, tmp_path, monkeypatch):
    no_ray_work(monkeypatch)
    with pytest.raises(BitrayError, match=r"bucket 'no-such-bucket-x' .* does not exist"):
        run_embedding(config(["s3://no-such-bucket-x/photos/"], str(tmp_path / "out")))


def test_wrong_credentials(s3_server, s3_bucket, tmp_path, monkeypatch):
    """moto checks signatures once its no-auth allowance is used up: a real refusal from the endpoint."""
    import moto.settings

    no_ray_work(monkeypatch)
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(BitrayError, match=r"access to 's3://.*' was refused \(InvalidAccessKeyId\)"):
        run_embedding(config([f"s3://{s3_bucket}/photos/"], str(tmp_path / "out")))


def test_unreachable_endpoint(tmp_path, monkeypatch):
    no_ray_work(monkeypatch)
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    storage = StorageConfig(s3_endpoint=f"http://127.0.0.1:{port}")
    with pytest.raises(BitrayError, match=rf"cannot reach the S3 endpoint http://127.0.0.1:{port}"):
        run_embedding(config(["s3://bucket/photos/"], str(tmp_path / "out"), storage=storage))


def test_empty_prefix(s3_server, s3_bucket, tmp_path, monkeypatch):
    no_ray_work(monkeypatch)
    with pytest.raises(BitrayError, match=r"no images found under s3://.*/empty/"):
        run_embedding(config([f"s3://{s3_bucket}/empty/"], str(tmp_path / "out")))


def test_missing_local_dir_via_cli(tmp_path, monkeypatch, capsys):
    no_ray_work(monkeypatch)
    code = main(["embed", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code != 0
    assert "does not exist" in err and str(tmp_path / "nope") in err
    assert "Traceback" not in err


def test_local_lock_refuses_second_run(tmp_path, monkeypatch):
    no_ray_work(monkeypatch)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(b"x")
    layout = output_layout(config([], str(tmp_path / "out")))
    with (
        open_lock(layout.lock_uri, "holder-run", storage=layout.storage, ttl_s=60),
        pytest.raises(LockHeld, match="holder-run"),
    ):
        run_embedding(config([str(tmp_path / "in")], str(tmp_path / "out")))
    # released: the next attempt gets past the lock (and is stopped by the spy, not the lock)
    with pytest.raises(AssertionError, match="started Ray work"):
        run_embedding(config([str(tmp_path / "in")], str(tmp_path / "out")))


def test_ray_client_with_local_paths_is_refused_before_anything_runs(tmp_path, monkeypatch):
    no_ray_work(monkeypatch)
    (tmp_path / "in").mkdir()
    with pytest.raises(BitrayError, match=r"local path .*/in' cannot be used through a ray:// client"):
        run_embedding(config([str(tmp_path / "in")], str(tmp_path / "out")), address="ray://head:10001")
    assert not (tmp_path / "out").exists()
