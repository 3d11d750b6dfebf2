"""Poison isolation: an image that kills the process decoding it costs only itself. The run does not loop
on it (Ray retries a dead worker's task for ever): the item is redone image by image in a child process,
the culprit becomes an error row naming the signal, and every other image is embedded once."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import CRASH_COLOUR, CRASH_MARKER
from embed_fixtures import SIZE, read_output, tiny_config, write_photos
from image_corpus import png_bomb
from PIL import Image

from bitray.embed import run_embedding
from bitray.embed.isolation import CrashLedger
from bitray.embed.sandbox import (
    CRASH_MARKER_ENV,
    DecodeOptions,
    DecoderCrashed,
    SandboxDecoder,
    decode_for_model,
)
from bitray.images import ImageDecodeError


def crashing_jpeg(seed: int = 1) -> bytes:
    """A valid JPEG (Pillow ignores bytes after its end marker) whose bytes hold the crash marker."""
    buf = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, "JPEG")
    return buf.getvalue() + CRASH_MARKER.encode()


def test_the_ledger_counts_attempts_that_never_ended():
    ledger = CrashLedger()
    assert ledger.begin("item") == 0  # first attempt: full speed
    assert ledger.begin("item") == 1  # its worker died: the retry is told
    ledger.end("item")
    assert ledger.begin("item") == 0  # an attempt that ended leaves nothing behind
    assert ledger.begin("other") == 0


def test_the_sandbox_survives_an_image_that_aborts_its_decoder(tmp_path):
    options = DecodeOptions((SIZE, SIZE))
    good = [p.read_bytes() for p in write_photos(tmp_path, 2)]
    with SandboxDecoder(options) as sandbox:
        first = sandbox.decode(good[0])
        with pytest.raises(DecoderCrashed, match=r"crashed the decoder process \(killed by SIGABRT\)"):
            sandbox.decode(crashing_jpeg())
        second = sandbox.decode(good[1])  # a fresh child takes the next image
        with pytest.raises(ImageDecodeError, match="not an image") as in_child:
            sandbox.decode(b"<!DOCTYPE html> nope")
    assert sandbox.crashes == 1
    for data, (pixels, width, height) in zip(good, (first, second), strict=True):
        expected = decode_for_model(data, options)  # the same pixels as decoding in this process
        assert np.array_equal(pixels, expected[0]) and (width, height) == expected[1:]
    with pytest.raises(ImageDecodeError) as in_process:
        decode_for_model(b"<!DOCTYPE html> nope", options)
    assert str(in_child.value) == str(in_process.value)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads the child's /proc environ")
def test_the_sandbox_child_gets_no_cloud_credentials(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-leak")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "key.json"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with SandboxDecoder(DecodeOptions((SIZE, SIZE))) as sandbox:
        sandbox.decode(write_photos(tmp_path, 1)[0].read_bytes())
        assert sandbox._child is not None
        raw = Path(f"/proc/{sandbox._child.pid}/environ").read_bytes()
    child = dict(item.split("=", 1) for item in raw.decode().split("\0") if item)
    assert "AWS_SECRET_ACCESS_KEY" not in child and "GOOGLE_APPLICATION_CREDENTIALS" not in child
    assert child["OMP_NUM_THREADS"] == "1" and child[CRASH_MARKER_ENV] == CRASH_MARKER
    assert child["PATH"] == os.environ["PATH"]


@pytest.mark.slow
def test_images_that_kill_or_would_exhaust_their_decoder_become_error_rows(tmp_path, ray_local):
    photos = write_photos(tmp_path / "in", 11)
    poison = tmp_path / "in" / "img-0-005b-poison.jpg"
    poison.write_bytes(crashing_jpeg())
    bomb = tmp_path / "in" / "img-0-007b-bomb.png"
    bomb.write_bytes(png_bomb(9000, 9000))  # 81 MP, within the pixel limit; 2 GB to decode
    out = tmp_path / "out"
    config = tiny_config([str(tmp_path / "in")], str(out), batch_size=4, rows_per_file=64, run_id="poisoned")

    summary = run_embedding(config)

    assert (summary.inputs, summary.embedded, summary.errored) == (13, 11, 2)
    emb, err = read_output(out)
    assert sorted(emb.path) == sorted(str(p) for p in photos)  # every other image, once
    errors = dict(zip(err.path, err.error, strict=True))
    assert sorted(errors) == [str(poison), str(bomb)] and set(err.stage) == {"decode"}
    assert "crashed the decoder process (killed by SIGABRT)" in errors[str(poison)]
    assert "over the decode-memory budget" in errors[str(bomb)]  # refused from its header


@pytest.mark.slow
def test_an_image_that_kills_the_model_actor_becomes_an_error_row(tmp_path, ray_local):
    photos = write_photos(tmp_path / "in", 9)
    poison = tmp_path / "in" / "img-0-004b-poison.png"
    Image.new("RGB", (SIZE, SIZE), CRASH_COLOUR).save(poison)
    out = tmp_path / "out"
    config = tiny_config([str(tmp_path / "in")], str(out), batch_size=4, rows_per_file=64, run_id="killer")

    summary = run_embedding(config)

    assert (summary.inputs, summary.embedded, summary.errored) == (10, 9, 1)
    emb, err = read_output(out)
    assert sorted(emb.path) == sorted(str(p) for p in photos)
    assert (err.path.tolist(), err.stage.tolist()) == ([str(poison)], ["embed"])
    assert "crashed the model's worker process" in err.error.iloc[0]
