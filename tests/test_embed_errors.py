"""Unusable inputs and outputs end a run at once, before any Ray work, with one clear message."""

from __future__ import annotations

import socket
import time

import pytest

from bitray.cli import main
from bitray.config import EmbedConfig, StorageConfig
from bitray.embed import run_embedding
from bitray.errors import BitrayError
from bitray.incremental import LockHeld, RunLock
from bitray.ledger import RunLayout


def config(inputs: list[str], output: str, **kwargs) -> EmbedConfig:
    return EmbedConfig(inputs=inputs, output=output, model="random:tiny", image_size=32, **kwargs)


def no_ray_work(monkeypatch) -> None:
    """Fail the test if the run gets as far as starting the Ray pipeline."""

    def refuse(*args, **kwargs):
        raise AssertionError("the run started Ray work")

    monkeypatch.setattr("bitray.embed._run_pipeline", refuse)


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
    layout = RunLayout(str(tmp_path / "out"), StorageConfig())
    with RunLock(layout, "holder-run"), pytest.raises(LockHeld, match=r"run holder-run by .*pid \d+"):
        run_embedding(config([str(tmp_path / "in")], str(tmp_path / "out")))
    # released: the next attempt gets past the lock (and is stopped by the spy, not the lock)
    with pytest.raises(AssertionError, match="started Ray work"):
        run_embedding(config([str(tmp_path / "in")], str(tmp_path / "out")))


def test_s3_lease_lock(s3_server, s3_bucket):
    layout = RunLayout(f"s3://{s3_bucket}/out", StorageConfig())
    with RunLock(layout, "first", ttl_s=60):
        with pytest.raises(LockHeld, match=r"run first by .*expires in"):
            RunLock(layout, "second", ttl_s=60).__enter__()
        with RunLock(layout, "first", ttl_s=60):  # the same run resuming may take its own lease over
            pass
    with RunLock(layout, "second", ttl_s=60):  # released: free again
        pass


def test_s3_expired_lease_is_taken_over(s3_server, s3_bucket):
    layout = RunLayout(f"s3://{s3_bucket}/out", StorageConfig())
    crashed = RunLock(layout, "crashed", ttl_s=1.0)
    crashed._acquire_lease()  # taken and never renewed nor released: a driver killed with SIGKILL
    with pytest.raises(LockHeld, match="run crashed"):
        RunLock(layout, "next", ttl_s=60).__enter__()
    time.sleep(1.2)
    with RunLock(layout, "next", ttl_s=60), pytest.raises(LockHeld, match="run next"):
        RunLock(layout, "other", ttl_s=60).__enter__()
