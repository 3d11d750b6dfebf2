"""``bitray search --image`` decodes its query as the index's output decoded its rows (``decode: fast`` by
default), so an indexed photo finds itself at a similarity of ~1, not 0.8-0.97."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from embed_fixtures import tiny_config
from PIL import Image

pytestmark = pytest.mark.slow


def write_large_photos(directory, count: int) -> list:  # noqa: ANN001
    """Smooth, photo-like JPEGs several times the model's size, where the fast decode (DCT scaling)
    gives other pixels than the exact one."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:192, 0:256].astype(np.float32)
    paths = []
    for i in range(count):
        phase = rng.uniform(0, 6, 3)
        waves = [np.sin(x / (9 + 5 * i) + phase[c]) * np.cos(y / (7 + 3 * c) - phase[c]) for c in range(3)]
        pixels = np.stack(waves, -1) * 90 + 128 + rng.normal(0, 12, (192, 256, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        path = directory / f"photo-{i}.jpg"
        path.write_bytes(buf.getvalue())
        paths.append(path)
    return paths


def test_an_indexed_image_finds_itself(tmp_path, ray_local, capsys):
    """With the default ``decode: fast`` (today's runs); search decoded ``exact`` before: 0.985 here."""
    from bitray.cli import main
    from bitray.embed import run_embedding
    from bitray.search.index import load_index, update_index

    photos = write_large_photos(tmp_path / "photos", 4)
    output = tmp_path / "out"
    run_embedding(tiny_config([str(tmp_path / "photos")], str(output)))
    update_index(str(output))
    capsys.readouterr()
    for photo in photos:
        assert (
            main(["search", "--index", str(output / "_index"), "--image", str(photo), "-k", "1", "--json"])
            == 0
        )
        [best] = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
        assert best["path"] == str(photo) and best["similarity"] >= 0.999, best
    index = load_index(str(output / "_index"))
    assert (index.meta.decode, index.meta.image_size) == ("fast", (32, 32))
