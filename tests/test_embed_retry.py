"""``--retry-errors``: recorded errors stay retryable. A retry run takes the object versions whose latest
result is an error, embeds what now works exactly once, records what still fails, and leaves versions that
are gone to incremental runs; error rows are never rewritten, a later run's row supersedes them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from embed_fixtures import read_output, tiny_config, write_photos

from bitray.cli import main
from bitray.embed import dry_run_embedding, run_embedding
from bitray.outputs import open_errors

pytestmark = pytest.mark.slow


def damage(path: Path) -> bytes:
    """Overwrite the middle of a JPEG with zeros (same size); returns the good bytes."""
    good = path.read_bytes()
    middle = len(good) // 2
    path.write_bytes(good[:20] + bytes(middle) + good[20 + middle :])
    return good


def restore(path: Path, good: bytes) -> None:
    """Put the good bytes back as the same version (size and mtime): a decoder that now succeeds."""
    stat = path.stat()
    path.write_bytes(good)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_retry_errors_embeds_what_works_now_and_keeps_what_still_fails(tmp_path, ray_local):
    inputs = tmp_path / "in"
    photos = write_photos(inputs, 6, side=48)
    fixed, gone = photos[0], photos[1]
    junk = inputs / "junk.jpg"
    junk.write_bytes(b"<!DOCTYPE html> not a photo")
    good_bytes = damage(fixed)
    damage(gone)
    out = tmp_path / "out"

    first = run_embedding(tiny_config([str(inputs)], str(out), run_id="first"))
    assert (first.inputs, first.embedded, first.errored) == (7, 4, 3)
    assert [e.object.uri for e in open_errors(str(out))] == sorted(str(p) for p in (fixed, gone, junk))

    restore(fixed, good_bytes)
    gone.unlink()
    retry = tiny_config([], str(out), retry_errors=True)
    assert dry_run_embedding(retry).counts.retried == 3
    second = run_embedding(retry.model_copy(update={"run_id": "second"}))

    assert (second.inputs, second.embedded, second.errored) == (3, 1, 2)
    emb, err = read_output(out)
    assert sorted(emb.path) == sorted(str(p) for p in photos if p != gone)  # `fixed` now, once
    assert emb.path.is_unique
    assert sorted(err[err.run_id == "second"].path) == sorted([str(gone), str(junk)])
    assert "ObjectMissing" in err[(err.run_id == "second") & (err.path == str(gone))].error.iloc[0]
    assert len(err[err.run_id == "first"]) == 3  # rows are never rewritten
    # the vanished version cannot be read again, the fixed one is embedded: only the junk stays open
    assert [e.object.uri for e in open_errors(str(out))] == [str(junk)]

    third = run_embedding(retry.model_copy(update={"run_id": "third"}))
    assert (third.inputs, third.embedded, third.errored) == (1, 0, 1)

    # on a schedule: --incremental --retry-errors takes what is new and the open errors still listed
    new = write_photos(inputs, 1, seed=7, side=48)[0]
    fourth = run_embedding(tiny_config([str(inputs)], str(out), incremental=True, retry_errors=True))
    assert (fourth.inputs, fourth.embedded, fourth.errored) == (2, 1, 1)
    emb, err = read_output(out)
    assert emb.path.is_unique and str(new) in set(emb.path)
    [still] = open_errors(str(out))
    assert (still.object.uri, still.stage, still.run_id) == (str(junk), "decode", fourth.run_id)
    assert still.error.startswith("ImageDecodeError: not an image")


def test_retry_with_no_open_errors_is_a_run_with_nothing_to_do(tmp_path, ray_local):
    inputs = tmp_path / "in"
    write_photos(inputs, 3)
    out = tmp_path / "out"
    run_embedding(tiny_config([str(inputs)], str(out), run_id="clean"))
    summary = run_embedding(tiny_config([], str(out), retry_errors=True))
    assert (summary.inputs, summary.embedded, summary.errored) == (0, 0, 0)
    emb, _ = read_output(out)
    assert len(emb) == 3


def test_bitray_errors_lists_the_open_errors_and_a_wrong_output_is_named(tmp_path, ray_local, capsys):
    inputs = tmp_path / "in"
    write_photos(inputs, 2)
    (inputs / "junk.jpg").write_bytes(b"<!DOCTYPE html> not a photo")
    (inputs / "empty.jpg").write_bytes(b"")
    out = tmp_path / "out"
    run_embedding(tiny_config([str(inputs)], str(out), run_id="once"))

    assert main(["errors", str(out), "--limit", "1"]) == 0
    printed = capsys.readouterr().out
    assert "2 open error(s)" in printed and "2  decode  ImageDecodeError" in printed
    assert f"{inputs / 'empty.jpg'}\tdecode\tImageDecodeError: empty file (0 bytes)" in printed
    assert "... and 1 more" in printed and "--retry-errors" in printed

    assert main(["errors", str(tmp_path / "typo")]) == 2
    assert "holds no finished embedding run" in capsys.readouterr().err
    assert main(["embed", "--output", str(tmp_path / "typo"), "--retry-errors"]) == 2
    assert "check the output path" in capsys.readouterr().err


def test_a_retry_takes_each_path_once_at_its_newest_version(tmp_path, ray_local):
    """Two open versions of one path (it failed, was replaced, failed again): a retry writes that path
    once, at the newest version, and the older version is no longer an open error."""
    inputs = tmp_path / "in"
    good = write_photos(inputs, 2, side=48)[0]
    photo = inputs / "photo.jpg"
    photo.write_bytes(b"<!DOCTYPE html> not a photo")  # version 1
    out = tmp_path / "out"
    run_embedding(tiny_config([str(inputs)], str(out), run_id="first"))
    good_bytes = good.read_bytes()
    photo.write_bytes(good_bytes)  # version 2: a new size and mtime ...
    good_bytes = damage(photo)  # ... that does not decode either
    run_embedding(tiny_config([str(inputs)], str(out), run_id="second", incremental=True))
    assert [(e.object.uri, e.run_id) for e in open_errors(str(out))] == [(str(photo), "second")]

    restore(photo, good_bytes)  # version 2 decodes now
    retry = run_embedding(tiny_config([], str(out), run_id="retry", retry_errors=True))
    assert (retry.inputs, retry.embedded, retry.errored) == (1, 1, 0)
    emb, err = read_output(out)
    assert list(emb[emb.run_id == "retry"].path) == [str(photo)] and err[err.run_id == "retry"].empty
    assert emb[emb.run_id == "retry"]["size"].iloc[0] == len(good_bytes)
    assert open_errors(str(out)) == []
