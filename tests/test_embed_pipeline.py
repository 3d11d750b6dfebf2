"""The embedding pipeline end to end on a real local Ray and a real S3 endpoint (moto), with a tiny BiT.

Covers the output contract, embedding equality with a direct model call, the bad-input corpus, re-running
a finished run, and incremental runs over new, changed and unchanged objects.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from embed_fixtures import SIZE, read_output, read_summary, snapshot, tiny_config, write_photos
from image_corpus import DIRECTORY_MARKER, corpus, upload_s3, write_local

from bitray.embed import run_embedding
from bitray.errors import BitrayError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _s3_env_before_ray(s3_server):
    """Ray workers inherit the environment Ray started with: export the S3 test credentials first."""


@pytest.fixture(scope="module")
def direct_model():
    from bitray.model import load_model

    return load_model("random:tiny")


def direct_embedding(loaded, data: bytes, *, exact: bool) -> np.ndarray:
    """The model on the pixels of ``decode: fast`` (``prepare_for_model``) or of a full-resolution decode."""
    from bitray.images import decode_image, prepare_for_model, resize_for_model

    if exact:
        pixels = resize_for_model(decode_image(data).pixels, (SIZE, SIZE))
    else:
        pixels = prepare_for_model(data, (SIZE, SIZE))[0].astype(np.float32) * np.float32(1 / 255)
    return loaded.model(pixels[None]).numpy()[0]


def check_corpus_output(emb, err, name_of, loaded, run_id: str, *, exact: bool) -> None:
    """Every corpus item is one embedding row or one error row with its reason, as the corpus says."""
    items = corpus()
    assert sorted(name_of(p) for p in [*emb.path, *err.path]) == sorted(items)  # each exactly once
    for path, stage, error in zip(err.path, err.stage, err.error, strict=True):
        item = items[name_of(path)]
        assert item.expected == "error", f"{item.name} should embed, got {error}"
        assert stage in ("read", "decode") and item.reason in error.lower()
    for row in emb.itertuples():
        item = items[name_of(row.path)]
        assert item.expected == "embedded"
        assert (row.width, row.height) == item.stored_size
        direct = direct_embedding(loaded, item.data, exact=exact)
        diff = np.abs(np.asarray(row.embedding, np.float32) - direct).max()
        assert diff < 1e-5, f"{item.name}: embedding differs from the direct model call by {diff}"
    assert set(emb.model) == {loaded.model_id} and set(emb.run_id) == {run_id} == set(err.run_id)


def test_local_output_contract_corpus_and_rerun(ray_local, tmp_path, direct_model, capsys):
    paths = write_local(tmp_path / "in")
    root = tmp_path / "in"
    out = tmp_path / "out"
    summary = run_embedding(tiny_config([str(root)], str(out), run_id="corpus"))
    assert "bitray: run corpus" in capsys.readouterr().out

    emb, err = read_output(out)
    check_corpus_output(emb, err, lambda p: os.path.relpath(p, root), direct_model, "corpus", exact=False)
    params = json.loads((out / "_bitray" / "runs" / "corpus" / "run.json").read_text())
    assert (params["decode"], params["max_decode_mb"]) == ("fast", 1200)  # the defaults, kept by the run
    schema = ds.dataset(out / "embeddings").schema  # plain pyarrow over the prefix: no staging files
    assert schema.field("embedding").type == pa.list_(pa.float32(), direct_model.feature_dim)
    for name in ("path", "model", "width", "height", "etag", "size", "mtime", "run_id"):
        assert name in schema.names
    first = paths["alpha.png"]
    row = emb[emb.path == str(first)].iloc[0]
    assert row["size"] == first.stat().st_size and row["mtime"].value == first.stat().st_mtime_ns
    assert set(ds.dataset(out / "errors").schema.names) >= {"path", "stage", "error", "run_id"}

    expected_errors = sum(item.expected == "error" for item in corpus().values())
    assert (summary.inputs, summary.errored) == (len(corpus()), expected_errors)
    assert summary.embedded + summary.errored == summary.inputs
    assert summary.model_id == direct_model.model_id and summary.images_per_s > 0
    assert read_summary(out, "corpus")["embedded"] == summary.embedded

    before = snapshot(out)  # a finished run, run again: nothing changes, it keeps its own settings
    again = run_embedding(tiny_config([str(root)], str(out), run_id="corpus", decode="exact"))
    assert "keeps its own settings: decode fast (not exact)" in capsys.readouterr().out
    assert snapshot(out) == before
    assert (again.inputs, again.embedded, again.processed) == (summary.inputs, summary.embedded, 0)

    with pytest.raises(BitrayError, match="already holds run.*--incremental"):  # a second, different run
        run_embedding(tiny_config([str(root)], str(out)))


def test_s3_output_contract_corpus(s3_server, s3_bucket, ray_local, direct_model):
    import boto3

    from bitray.config import StorageConfig
    from bitray.storage import s3_filesystem

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    keys = upload_s3(client, s3_bucket, "photos/")  # also a directory marker, which is no input
    out = f"s3://{s3_bucket}/out/run"
    summary = run_embedding(tiny_config([f"s3://{s3_bucket}/photos/"], out, run_id="s3run", decode="exact"))

    prefix = f"s3://{s3_bucket}/photos/"
    fs = s3_filesystem(StorageConfig())
    emb, err = read_output(f"{s3_bucket}/out/run", filesystem=fs)
    check_corpus_output(emb, err, lambda p: p.removeprefix(prefix), direct_model, "s3run", exact=True)
    assert summary.inputs == len(keys) and f"{prefix}{DIRECTORY_MARKER}" not in set(emb.path) | set(err.path)
    etags = {o["Key"]: o["ETag"].strip('"') for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"]}
    assert all(
        etags[p.removeprefix(f"s3://{s3_bucket}/")] == e for p, e in zip(emb.path, emb.etag, strict=True)
    )
    listed = {o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="out/run/")["Contents"]}
    assert "out/run/_bitray/runs/s3run/summary.json" in listed
    assert not [k for k in listed if "/embeddings/" in k and not k.endswith(".parquet")]


def test_incremental_new_changed_unchanged(ray_local, tmp_path, monkeypatch, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    photos = write_photos(src, 5)
    first = run_embedding(tiny_config([str(src)], str(out), incremental=True, run_id="w1"))
    assert (first.inputs, first.embedded, first.unchanged) == (5, 5, 0)

    # w1 killed after its summary, before the state recorded it: the next run records w1 first
    w1 = out / "_bitray" / "runs" / "w1"
    (out / "_bitray" / "state" / "current.json").unlink()  # w1 was the only run the state knew

    write_photos(src, 2, seed=1)  # two new objects
    changed = photos[0]
    changed.write_bytes(photos[1].read_bytes())  # one changed object (new size and mtime)
    os.utime(changed, ns=(time.time_ns(), time.time_ns()))
    second = run_embedding(tiny_config([str(src)], str(out), incremental=True, run_id="w2"))
    assert "finishing the interrupted run w1 first" in capsys.readouterr().out
    assert (w1 / "summary.json").exists()
    assert (second.inputs, second.embedded, second.unchanged) == (3, 3, 4)

    def refuse(*args, **kwargs):
        raise AssertionError("an unchanged bucket must cost a listing and no Ray work")

    monkeypatch.setattr("bitray.embed.pipeline.run_pipeline", refuse)
    third = run_embedding(tiny_config([str(src)], str(out), incremental=True, run_id="w3"))
    assert (third.inputs, third.embedded, third.unchanged) == (0, 0, 7)

    emb, err = read_output(out)
    assert err.empty and len(emb) == 8, (err.to_dict("records"), len(emb))  # 5 + 2 new + 1 new version
    versions = list(zip(emb.path, emb["size"], emb.mtime, strict=True))
    assert len(set(versions)) == len(versions)  # every object version exactly once
    assert sorted(emb[emb.path == str(changed)].run_id) == ["w1", "w2"]


def test_model_that_cannot_load_stops_with_its_reason(ray_local, tmp_path):
    from bitray.embed.layout import output_layout

    src, out = tmp_path / "in", tmp_path / "out"
    write_photos(src, 3)
    config = tiny_config([str(src)], str(out), model="random:nope", run_id="bad")
    with pytest.raises(BitrayError, match=r"unknown BiT architecture 'nope'.*nothing of run bad was kept"):
        run_embedding(config)
    assert not output_layout(config).is_begun("bad")  # a fixed run may start afresh
    assert not (out / "_bitray" / "runs" / "bad").exists()
