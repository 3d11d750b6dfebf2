"""``bitray submit`` / ``bitray jobs`` against a real local Ray head (its job server on 127.0.0.1), moto S3
and an MLflow sqlite store: real pipelines run as Ray jobs and their outputs are checked."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from cluster_fixtures import tiny_embed_config
from PIL import Image

from bitray.cli import main
from bitray.errors import BitrayError
from bitray.jobs import JobFailed, JobNotFound, Jobs, runtime_env_for, stage_job, submit

pytest_plugins = ["cluster_fixtures"]

S3_ENV = ["--env", "AWS_ACCESS_KEY_ID=testing", "--env", "AWS_SECRET_ACCESS_KEY=testing"]
JOB_TIMEOUT_S = 300


def png(seed: int, size: int = 40) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def free_address() -> str:
    from cluster_fixtures import free_port

    return f"http://127.0.0.1:{free_port()}"


# -- no cluster needed -----------------------------------------------------------------------------------


def test_unreachable_head_is_one_clear_error(capsys, tmp_path):
    address = free_address()
    config = write_yaml(tmp_path / "embed.yaml", tiny_embed_config(str(tmp_path), str(tmp_path / "out")))
    for argv in (
        ["jobs", "list", "--address", address],
        ["submit", "embed", "--config", str(config), "--address", address],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"cannot reach the Ray job server at {address}" in err
        assert "Traceback" not in err


def test_address_comes_from_flag_or_ray_address(monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["jobs", "list"]) == 2
    assert "no Ray cluster address: pass --address" in capsys.readouterr().err
    address = free_address()
    monkeypatch.setenv("RAY_ADDRESS", address)
    assert main(["jobs", "list"]) == 2
    assert address in capsys.readouterr().err


def test_staged_job_holds_config_with_overrides_and_entrypoint(tmp_path):
    config = write_yaml(tmp_path / "nightly.yaml", {"output": "s3://b/out", "batch_size": 8})
    entrypoint = stage_job("embed", config, tmp_path / "job", overrides={"incremental": True, "run_id": "w1"})
    assert entrypoint == "python pipelines/embed.py --config nightly.yaml"
    assert (tmp_path / "job" / "pipelines" / "embed.py").is_file()
    staged = yaml.safe_load((tmp_path / "job" / "nightly.yaml").read_text())
    assert staged == {"output": "s3://b/out", "batch_size": 8, "incremental": True, "run_id": "w1"}
    with pytest.raises(BitrayError, match="unknown pipeline 'train'"):
        stage_job("train", config, tmp_path / "other")
    with pytest.raises(BitrayError, match="does not exist"):
        stage_job("embed", tmp_path / "missing.yaml", tmp_path / "third")


def test_installed_bitray_without_checkout_runs_the_same_command(tmp_path, monkeypatch):
    import bitray.jobs

    monkeypatch.setattr(bitray.jobs, "PIPELINES_DIR", tmp_path / "no-checkout")
    config = write_yaml(tmp_path / "ft.yaml", {"steps": 5})
    entrypoint = stage_job("finetune", config, tmp_path / "job", extra_args=["--name", "a b"])
    assert entrypoint == "python -m bitray finetune --config ft.yaml --name 'a b'"
    assert not (tmp_path / "job" / "pipelines").exists()


def test_runtime_env_ships_bitray_and_only_the_users_env(tmp_path):
    import bitray

    env = runtime_env_for(tmp_path, {"MLFLOW_TRACKING_URI": "http://mlflow:5000"})
    assert env["working_dir"] == str(tmp_path)
    assert env["env_vars"] == {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    assert env["py_modules"] == [str(Path(bitray.__file__).resolve().parent)]
    assert "env_vars" not in runtime_env_for(tmp_path) and "py_modules" not in runtime_env_for(
        tmp_path, ship_bitray=False
    )


# -- against the local head -----------------------------------------------------------------------------


@pytest.mark.slow
def test_submit_embed_job_from_s3_to_s3(ray_head, s3_server, s3_bucket, capsys, tmp_path):
    from bitray import storage
    from bitray.config import StorageConfig

    s3 = storage.s3_client(StorageConfig(s3_endpoint=s3_server))
    names = [f"in/img{i}.png" for i in range(3)]
    for i, key in enumerate(names):
        s3.put_object(Bucket=s3_bucket, Key=key, Body=png(i))
    config = write_yaml(
        tmp_path / "embed.yaml",
        tiny_embed_config(
            f"s3://{s3_bucket}/in/", f"s3://{s3_bucket}/out", storage={"s3_endpoint": s3_server}
        ),
    )

    code = main(["submit", "embed", "--config", str(config), "--address", ray_head, "--wait", *S3_ENV])
    out = capsys.readouterr()
    assert code == 0, out.err
    job_id = out.out.splitlines()[0]
    assert job_id.startswith("raysubmit_")
    assert "bitray: run" in out.out  # the job's own log lines were streamed

    fs, path = storage.filesystem_for(
        f"s3://{s3_bucket}/out/embeddings", StorageConfig(s3_endpoint=s3_server)
    )
    table = pq.read_table(path, filesystem=fs)
    assert sorted(table.column("path").to_pylist()) == [f"s3://{s3_bucket}/{k}" for k in names]

    assert main(["jobs", "status", job_id, "--address", ray_head]) == 0
    assert capsys.readouterr().out.startswith("SUCCEEDED")
    assert main(["jobs", "list", "--address", ray_head]) == 0
    listing = capsys.readouterr().out
    assert job_id in listing and "embed" in listing


@pytest.mark.slow
def test_status_logs_stop_on_a_running_job_and_reused_id(ray_head, capsys, tmp_path):
    jobs = Jobs(ray_head)
    job_id = jobs.client.submit_job(
        entrypoint="python -c \"import time; print('sleeper up', flush=True); time.sleep(600)\""
    )
    deadline = time.monotonic() + 120
    while "sleeper up" not in jobs.logs(job_id):
        assert time.monotonic() < deadline, jobs.status(job_id)
        time.sleep(0.5)

    assert main(["jobs", "status", job_id, "--address", ray_head]) == 0
    assert capsys.readouterr().out.startswith("RUNNING")
    assert main(["jobs", "logs", job_id, "--address", ray_head]) == 0
    assert "sleeper up" in capsys.readouterr().out
    assert main(["jobs", "stop", job_id, "--address", ray_head]) == 0
    assert capsys.readouterr().out.startswith("STOPPED")
    assert main(["jobs", "status", job_id, "--address", ray_head]) == 1

    # A submission id the cluster has seen is refused before anything is uploaded or run.
    config = write_yaml(tmp_path / "embed.yaml", tiny_embed_config(str(tmp_path), str(tmp_path / "out")))
    before = len(jobs.list())
    argv = ["submit", "embed", "--config", str(config), "--address", ray_head, "--submission-id", job_id]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"submission id {job_id!r} was already used" in err and "Traceback" not in err
    assert len(jobs.list()) == before

    assert main(["jobs", "status", "no-such-job", "--address", ray_head]) == 2
    assert "no such job" in capsys.readouterr().err
    with pytest.raises(JobNotFound, match="no such job"):  # typed, so callers need not parse the message
        jobs.status("no-such-job")


@pytest.mark.slow
def test_failed_job_is_one_clear_error(ray_head, capsys, tmp_path):
    config = write_yaml(
        tmp_path / "embed.yaml", tiny_embed_config(str(tmp_path / "no-such-dir"), str(tmp_path / "out"))
    )
    with pytest.raises(
        JobFailed, match=r"job \S+ failed: Job entrypoint command failed with exit code 2"
    ) as exc:
        submit("embed", config, ray_head, wait=True)
    assert "does not exist" in str(exc.value)  # the last log lines say why

    assert main(["submit", "embed", "--config", str(config), "--address", ray_head, "--wait"]) == 2
    captured = capsys.readouterr()
    assert "no-such-dir" in captured.out  # streamed job log
    assert "failed: Job entrypoint command failed with exit code 2" in captured.err
    assert "Traceback" not in captured.err
