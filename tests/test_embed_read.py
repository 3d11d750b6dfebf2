"""The CPU stage on its own: each input becomes pixels or one error record, and only the listed version."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from image_corpus import corpus, encode, png_bomb

from bitray.config import StorageConfig
from bitray.embed.decode import decode_items
from bitray.embed.manifest import manifest_table
from bitray.embed.ranges import RowRanges
from bitray.embed.sandbox import DecodeOptions
from bitray.images import prepare_for_model
from bitray.storage import list_objects

NOTHING_COMMITTED = RowRanges().as_arrays()


def decode_manifest(manifest: pa.Table, items: list[tuple[int, int]], batch_size: int = 64, **kwargs):  # noqa: ANN003, ANN201
    """The blocks ``decode_items`` yields for ``items`` (row ranges of one manifest part on local disk)."""
    with tempfile.TemporaryDirectory() as manifest_dir:
        pq.write_table(manifest, Path(manifest_dir) / "part-00000.parquet")
        table = pa.table({"part": ["part-00000.parquet"] * len(items), "start": [a for a, _ in items],
                          "stop": [b for _, b in items]})  # fmt: skip
        kwargs = {"storage_config": StorageConfig(), "committed": NOTHING_COMMITTED, "max_bytes": None,
                  "options": DecodeOptions((32, 32)), **kwargs}  # fmt: skip
        return list(decode_items(table, manifest_dir=manifest_dir, batch_size=batch_size, **kwargs))


def run_stage(objects, storage=None, committed=NOTHING_COMMITTED, **options):  # noqa: ANN001, ANN201
    blocks = decode_manifest(
        manifest_table(objects),
        [(0, len(objects))],
        storage_config=storage or StorageConfig(),
        options=DecodeOptions((32, 32), **options),
        committed=committed,
    )
    out = pa.concat_tables(blocks)
    rows = out.drop_columns(["pixels"]).to_pylist()
    pixels = out.column("pixels").combine_chunks().to_numpy_ndarray()
    images = [(r, p) for r, p in zip(rows, pixels, strict=True) if r["stage"] is None]
    errors = [r for r in rows if r["stage"] is not None]
    stacked = np.stack([p for _, p in images]) if images else np.zeros((0, 32, 32, 3), np.uint8)
    return stacked, [r for r, _ in images], errors


def test_local_object_changed_after_listing_is_a_read_error(tmp_path):
    photo = corpus()["grey.jpg"].data
    for name in ("same.jpg", "changed.jpg"):
        (tmp_path / name).write_bytes(photo)
    listed = list(list_objects(str(tmp_path)))
    (tmp_path / "changed.jpg").write_bytes(photo + b"\0")  # a new version after the listing
    pixels, images, errors = run_stage(listed)
    assert [i["path"] for i in images] == [str(tmp_path / "same.jpg")] and pixels.shape == (1, 32, 32, 3)
    assert pixels.dtype == np.uint8 and pixels.max() > 0  # uint8 travels; the model scales it
    assert [(e["path"], e["stage"]) for e in errors] == [(str(tmp_path / "changed.jpg"), "read")]
    assert "changed after it was listed" in errors[0]["error"]


def test_decode_choice_and_memory_budget_reach_the_decoder(tmp_path):
    from skimage import data as skdata

    photo = encode(np.repeat(np.repeat(skdata.astronaut(), 2, axis=0), 2, axis=1), "JPEG", quality=90)
    (tmp_path / "a-photo.jpg").write_bytes(photo)  # 1024x1024: drafted to 1/8 for 32x32
    (tmp_path / "b-bomb.png").write_bytes(png_bomb(6000, 6000))  # 36 MP RGBA: about 927 MB to decode
    listed = list(list_objects(str(tmp_path)))
    for exact in (False, True):
        pixels, images, errors = run_stage(listed, exact=exact, max_decode_bytes=512 * 2**20)
        assert [i["path"] for i in images] == [str(tmp_path / "a-photo.jpg")]
        np.testing.assert_array_equal(pixels[0], prepare_for_model(photo, (32, 32), exact=exact)[0])
        assert [(e["path"], e["stage"]) for e in errors] == [(str(tmp_path / "b-bomb.png"), "decode")]
        assert "needs about 927 MB, over the decode-memory budget of 512 MB" in errors[0]["error"]
    fast, exact = (prepare_for_model(photo, (32, 32), exact=e)[0] for e in (False, True))
    assert not np.array_equal(fast, exact)  # so the loop above tells the two apart


def test_committed_rows_are_not_read_again(tmp_path):
    photo = corpus()["grey.jpg"].data
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (tmp_path / name).write_bytes(photo)
    listed = list(list_objects(str(tmp_path)))
    (tmp_path / "b.jpg").unlink()  # would be a read error, were it read
    _, images, errors = run_stage(listed, committed=RowRanges([(1, 2)]).as_arrays())
    assert [i["path"] for i in images] == [str(tmp_path / "a.jpg"), str(tmp_path / "c.jpg")]
    assert [i["row"] for i in images] == [0, 2] and errors == []


def test_s3_object_changed_or_deleted_after_listing(s3_server, s3_bucket):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    photo = corpus()["photo.webp"].data
    for key in ("in/same.webp", "in/changed.webp", "in/deleted.webp"):
        client.put_object(Bucket=s3_bucket, Key=key, Body=photo)
    listed = list(list_objects(f"s3://{s3_bucket}/in/"))
    client.put_object(Bucket=s3_bucket, Key="in/changed.webp", Body=corpus()["grey.jpg"].data)
    client.delete_object(Bucket=s3_bucket, Key="in/deleted.webp")
    _, images, errors = run_stage(listed)
    assert [i["path"] for i in images] == [f"s3://{s3_bucket}/in/same.webp"]
    reasons = {e["path"].rsplit("/", 1)[1]: (e["stage"], e["error"]) for e in errors}
    assert reasons["changed.webp"] == ("read", reasons["changed.webp"][1])
    assert "changed after it was listed" in reasons["changed.webp"][1]
    assert reasons["deleted.webp"][0] == "read" and "ObjectMissing" in reasons["deleted.webp"][1]


def test_decode_items_yields_one_block_per_model_batch_of_each_item(tmp_path):
    """Items are row ranges of a manifest part; each is cut into model batches, committed rows dropped."""
    photo = corpus()["grey.jpg"].data
    for i in range(10):
        (tmp_path / f"{i:02d}.jpg").write_bytes(photo)
    manifest = manifest_table(list(list_objects(str(tmp_path))))
    committed = RowRanges([(3, 4)]).as_arrays()
    blocks = decode_manifest(manifest, [(0, 7), (7, 10)], batch_size=3, committed=committed)
    assert [b.column("row").to_pylist() for b in blocks] == [[0, 1, 2], [4, 5, 6], [7, 8, 9]]
    assert all(b.column("pixels").type.shape == (32, 32, 3) for b in blocks)
    assert all(b.column("stage").null_count == b.num_rows for b in blocks)  # every image decoded
