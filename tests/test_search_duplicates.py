"""Near-duplicates over a real pipeline output: scikit-image's photos with planted copies and near copies.

The model is ``random:tiny`` at 32 px, honest about what it can do: its random-init features are close to
a smoothed thumbnail, so a re-encoded or resized copy stays above 0.96 cosine while the 15 distinct
photos stay below 0.7 of each other (measured); 0.95 separates them. It says nothing about semantic
near-duplicates, which need real BiT weights.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from embed_fixtures import tiny_config
from PIL import Image

from bitray.errors import BitrayError

pytestmark = pytest.mark.slow


def reencoded(source: Path, target: Path, *, scale: float = 1.0, quality: int | None = None) -> Path:
    image = Image.open(source).convert("RGB")
    if scale != 1.0:
        image = image.resize(
            (round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR
        )
    buffer = io.BytesIO()
    image.save(buffer, "JPEG" if quality else "PNG", **({"quality": quality} if quality else {}))
    target.write_bytes(buffer.getvalue())
    return target


@pytest.fixture(scope="module")
def planted(tmp_path_factory, ray_local) -> dict:
    from bitray.embed import run_embedding
    from bitray.examples import write_sample_photos
    from bitray.search.index import update_index

    root = tmp_path_factory.mktemp("dups")
    photos = write_sample_photos(root / "photos")
    originals = sorted(photos.iterdir())
    assert len(originals) == 15
    shutil.copyfile(photos / "coffee.png", photos / "zz-copy-of-coffee.png")
    reencoded(photos / "chelsea.jpg", photos / "zz-chelsea-q40.jpg", quality=40)
    reencoded(photos / "astronaut.jpg", photos / "zz-astronaut-half.png", scale=0.5)
    reencoded(photos / "rocket.png", photos / "zz-rocket-small.jpg", scale=0.7, quality=60)
    output = root / "out"
    run_embedding(tiny_config([str(photos)], str(output), run_id="photos"))
    update_index(str(output))
    return {"root": root, "photos": photos, "output": output, "index": output / "_index"}


def test_duplicates_find_the_planted_groups_and_flag_the_exact_copy(planted, tmp_path, capsys):
    from bitray.cli import main
    from bitray.search.sheet import SheetLayout

    out, sheet = tmp_path / "dups.parquet", tmp_path / "dups.png"
    argv = ["duplicates", "--index", str(planted["index"]), "--threshold", "0.95", "--output", str(out)]
    assert main([*argv, "--sheet", str(sheet)]) == 0
    assert "4 group(s), 8 image(s), 1 exact copies" in capsys.readouterr().out
    table = pq.read_table(out)
    assert table.column_names == [
        "group",
        "path",
        "similarity",
        "representative",
        "exact",
        "group_size",
        "etag",
        "size",
    ]
    photos = planted["photos"]
    groups: dict[int, list[dict]] = {}
    for row in table.to_pylist():
        groups.setdefault(row["group"], []).append(row)
    found = {frozenset(Path(r["path"]).name for r in rows) for rows in groups.values()}
    assert found == {
        frozenset({"coffee.png", "zz-copy-of-coffee.png"}),
        frozenset({"chelsea.jpg", "zz-chelsea-q40.jpg"}),
        frozenset({"astronaut.jpg", "zz-astronaut-half.png"}),
        frozenset({"rocket.png", "zz-rocket-small.jpg"}),
    }
    for rows in groups.values():
        rep, member = rows  # the representative first; a tie in pairs goes to the first path
        assert rep["representative"] and not member["representative"] and rep["path"] < member["path"]
        assert rep["similarity"] == 1.0 and rep["exact"] and rep["group_size"] == member["group_size"] == 2
        copy = Path(member["path"]).name == "zz-copy-of-coffee.png"
        assert member["exact"] == copy
        assert member["similarity"] >= 0.95 and (member["similarity"] == pytest.approx(1.0, abs=1e-5)) == copy
        assert member["path"].startswith(str(photos))
    assert Image.open(sheet).size == SheetLayout().size(8)


def test_the_threshold_decides_the_groups(planted, tmp_path):
    from bitray.search.duplicates import DuplicateOptions, find_duplicates
    from bitray.search.index import load_index

    index = load_index(str(planted["index"]))
    with pytest.raises(BitrayError, match="between -1 and 1"):
        find_duplicates(index, DuplicateOptions(threshold=1.5))
    strict = find_duplicates(index, DuplicateOptions(threshold=0.99999))
    assert {Path(p).name for p in strict.column("path").to_pylist()} == {
        "coffee.png",
        "zz-copy-of-coffee.png",
    }
    loose = find_duplicates(index, DuplicateOptions(threshold=-1.0))
    assert loose.num_rows == 19 and set(loose.column("group").to_pylist()) == {0}
    sims = loose.column("similarity").to_numpy()
    vectors = index.vectors_of(index.rows.column("id").to_numpy())
    rep = loose.filter(loose.column("representative")).column("path")[0].as_py()
    rep_vector = vectors[index.rows.column("path").to_pylist().index(rep)]
    want = {
        p: float(v @ rep_vector) for p, v in zip(index.rows.column("path").to_pylist(), vectors, strict=True)
    }
    np.testing.assert_allclose(sims[1:], [want[p] for p in loose.column("path").to_pylist()[1:]], atol=1e-5)


def rewritten_index(planted: dict, target: Path, changes: dict[str, str]) -> Path:
    """A copy of the planted index whose rows file names other paths (``{file name: new path}``)."""
    import pyarrow as pa

    shutil.copytree(planted["index"], target)
    (rows_file,) = target.glob("rows-*.parquet")
    rows = pq.read_table(rows_file)
    paths = [changes.get(Path(p).name, p) for p in rows.column("path").to_pylist()]
    pq.write_table(rows.set_column(rows.schema.get_field_index("path"), "path", pa.array(paths)), rows_file)
    return target


def test_a_rewritten_index_cannot_make_duplicates_read_outside_the_inputs(planted, tmp_path, capsys):
    """The index says the coffee copy lives outside the embedded folder (a file with the same bytes, as
    /etc/passwd could be): it is neither hashed nor drawn; the rows under the inputs still are."""
    from bitray.cli import main
    from bitray.search.duplicates import sheet_items
    from bitray.search.sheet import MISSING, SheetLayout

    outside = tmp_path / "outside" / "secret.png"
    outside.parent.mkdir()
    shutil.copyfile(planted["photos"] / "coffee.png", outside)
    index = rewritten_index(planted, tmp_path / "index", {"zz-copy-of-coffee.png": str(outside)})
    out, sheet = tmp_path / "dups.parquet", tmp_path / "dups.png"
    argv = ["duplicates", "--index", str(index), "--output", str(out), "--sheet", str(sheet)]
    assert main(argv) == 0
    assert "4 group(s), 8 image(s), 0 exact copies" in capsys.readouterr().out
    table = pq.read_table(out)
    items = sheet_items(table)
    layout, drawn = SheetLayout(), Image.open(sheet).convert("RGB")
    for i, item in enumerate(items):
        left, top = layout.tile_origin(i)
        corner = drawn.getpixel((left + 1, top + layout.thumb - 2))  # photos are not square: white if drawn
        assert (corner == MISSING) == (item.uri == str(outside)), item.uri

    # a search's sheet likewise: the nearest neighbour of the coffee photo is the rewritten copy
    argv = ["search", "--index", str(index), "--path", str(planted["photos"] / "coffee.png"), "-k", "2"]
    assert main([*argv, "--sheet", str(tmp_path / "search.png")]) == 0
    assert str(outside) in capsys.readouterr().out.splitlines()[0]
    drawn = Image.open(tmp_path / "search.png").convert("RGB")
    for i, grey in enumerate([False, True, False]):  # query, the rewritten copy, the next neighbour
        left, top = layout.tile_origin(i)
        assert (drawn.getpixel((left + 1, top + layout.thumb - 2)) == MISSING) == grey


def test_index_reads_stay_under_the_recorded_inputs_and_max_bytes(planted, tmp_path):
    from bitray.search.scope import IndexReads

    reads = IndexReads.of_output(str(planted["output"]))
    assert reads.prefixes == (str(planted["photos"]),) and reads.max_bytes == 256 * 2**20
    inside = planted["photos"] / "coffee.png"
    assert reads.read(str(inside)) == inside.read_bytes()
    for path in (
        "/etc/passwd",
        "/dev/zero",
        f"{planted['photos']}/../../etc/passwd",
        f"{planted['photos']}x/a",
    ):
        with pytest.raises(BitrayError, match="not under the inputs"):
            reads.read(path)
    small = IndexReads(reads.output, reads.prefixes, max_bytes=100)
    with pytest.raises(BitrayError, match="over the cap of 100 bytes"):
        small.read(str(inside))
    assert IndexReads(reads.output, ("/dev",), 100).allows("/dev/zero")
    with pytest.raises(BitrayError, match="not a regular file"):  # never read until memory runs out
        IndexReads(reads.output, ("/dev",), 100).read("/dev/zero")
