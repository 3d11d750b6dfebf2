"""The index and search over real pipeline outputs: build, incremental add, replacement, by image, by path."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from embed_fixtures import tiny_config, write_photos
from PIL import Image

from bitray.errors import BitrayError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, ray_local) -> dict:
    """One output, two finished incremental runs; the second changes one photo and adds three."""
    from bitray.embed import run_embedding

    root = tmp_path_factory.mktemp("search")
    photos = root / "photos"
    first = write_photos(photos, 10, seed=1)
    output = root / "out"
    run_embedding(tiny_config([str(photos)], str(output), incremental=True, run_id="run-a"))
    index = root / "index"
    from bitray.search.index import update_index

    report_a = update_index(str(output), str(index))
    snapshot = {p.name: p.read_bytes() for p in index.iterdir()}
    changed = first[3]
    buf = io.BytesIO()
    Image.fromarray(np.full((40, 44, 3), 200, np.uint8)).save(buf, "JPEG")
    changed.write_bytes(buf.getvalue())
    added = write_photos(photos, 3, seed=2)
    run_embedding(tiny_config([str(photos)], str(output), incremental=True, run_id="run-b"))
    report_b = update_index(str(output), str(index))
    return {
        "root": root,
        "photos": photos,
        "output": output,
        "index": index,
        "first": first,
        "changed": changed,
        "added": added,
        "reports": (report_a, report_b),
        "snapshot_a": snapshot,
    }


def embeddings_of(output: Path) -> dict[tuple[str, str], np.ndarray]:
    table = pq.read_table(output / "embeddings")
    return {
        (p, r): np.asarray(e, np.float32)
        for p, r, e in zip(
            table.column("path").to_pylist(),
            table.column("run_id").to_pylist(),
            table.column("embedding").to_pylist(),
            strict=True,
        )
    }


def test_outputs_view_of_a_pipeline_output(two_runs):
    from bitray import outputs

    output = str(two_runs["output"])
    assert outputs.finished_runs(output) == ["run-a", "run-b"]
    files_b = outputs.committed_files(output, runs=["run-b"])
    assert files_b and all("/part-run-b-" in f for f in files_b)
    assert len(outputs.committed_files(output)) > len(files_b)
    assert outputs.committed_files(output, "errors") == []
    assert outputs.run_model(output, "run-a") == ("random:tiny", (32, 32))


def test_index_built_then_updated_incrementally(two_runs):
    from bitray.search.index import load_index

    report_a, report_b = two_runs["reports"]
    assert (report_a.kind, report_a.count, report_a.added, report_a.rebuilt) == ("flat", 10, 10, True)
    assert report_b.new_runs == ["run-b"] and not report_b.rebuilt
    assert (report_b.count, report_b.added, report_b.replaced) == (13, 4, 1)

    index = load_index(str(two_runs["index"]))
    meta = index.meta
    assert meta.runs == ["run-a", "run-b"] and meta.model_id == "bit-tiny@random-init"
    assert (meta.model_spec, meta.image_size, meta.dim, meta.count) == ("random:tiny", (32, 32), 1024, 13)
    assert meta.embeddings == str(two_runs["output"])
    paths = index.rows.column("path").to_pylist()
    assert sorted(paths) == sorted(str(p) for p in [*two_runs["first"], *two_runs["added"]])
    runs = dict(zip(paths, index.rows.column("run_id").to_pylist(), strict=True))
    assert runs[str(two_runs["changed"])] == "run-b"  # the changed object's newest version replaced the old
    assert runs[str(two_runs["first"][0])] == "run-a"
    # the stored vectors are the pipeline's, unit length
    stored = embeddings_of(two_runs["output"])
    for path, run, vid in zip(
        paths, index.rows.column("run_id").to_pylist(), index.rows.column("id").to_numpy(), strict=True
    ):
        want = stored[(path, run)] / np.linalg.norm(stored[(path, run)])
        np.testing.assert_allclose(index.vectors_of(np.array([vid]))[0], want, rtol=1e-5, atol=1e-6)
    # one generation on storage: the old one was removed after index.json moved on
    names = sorted(p.name for p in two_runs["index"].iterdir())
    assert len(names) == 3 and names[0] == "index.json"
    assert json.loads((two_runs["index"] / "index.json").read_text())["generation"] in names[1]


def test_index_again_without_new_runs_changes_nothing(two_runs):
    from bitray.search.index import update_index

    before = {p.name: p.read_bytes() for p in two_runs["index"].iterdir()}
    report = update_index(str(two_runs["output"]), str(two_runs["index"]))
    assert (report.added, report.replaced, report.new_runs) == (0, 0, [])
    assert {p.name: p.read_bytes() for p in two_runs["index"].iterdir()} == before


def test_search_by_path_and_by_image_match_brute_force(two_runs):
    from bitray.search.index import load_index
    from bitray.search.query import search

    index = load_index(str(two_runs["index"]))
    stored = embeddings_of(two_runs["output"])
    live = {
        p: stored[(p, r)]
        for p, r in zip(
            index.rows.column("path").to_pylist(), index.rows.column("run_id").to_pylist(), strict=True
        )
    }
    paths = sorted(live)
    matrix = np.stack([live[p] / np.linalg.norm(live[p]) for p in paths])

    query = str(two_runs["first"][5])
    result = search(index, path=query, k=4)
    sims = matrix @ matrix[paths.index(query)]
    order = [i for i in np.argsort(-sims, kind="stable") if paths[i] != query][:4]
    assert result.column("path").to_pylist() == [paths[i] for i in order]
    np.testing.assert_allclose(result.column("similarity").to_numpy(), sims[order], atol=1e-5)
    assert result.column("rank").to_pylist() == [1, 2, 3, 4]
    assert set(result.column_names) >= {"path", "similarity", "etag", "size", "mtime", "run_id"}

    # by image: the changed photo's new bytes embed to its stored vector, so it comes first at ~1.0
    result = search(str(two_runs["index"]), image=str(two_runs["changed"]), k=3)
    assert result.column("path")[0].as_py() == str(two_runs["changed"])
    assert result.column("similarity")[0].as_py() == pytest.approx(1.0, abs=1e-4)
    assert result.num_rows == 3


def test_search_errors_are_clear(two_runs, tmp_path):
    from bitray.search.query import search

    with pytest.raises(BitrayError, match="is not in index"):
        search(str(two_runs["index"]), path=str(tmp_path / "nope.jpg"))
    with pytest.raises(BitrayError, match="no index at"):
        search(str(tmp_path / "missing"), path="x")
    with pytest.raises(BitrayError, match="exactly one query"):
        search(str(two_runs["index"]))
    # an index whose recorded model id differs from what its spec loads now
    copy = tmp_path / "index"
    shutil.copytree(two_runs["index"], copy)
    meta = json.loads((copy / "index.json").read_text())
    meta["model_id"] = "bit-s-r101x1@tfhub"
    (copy / "index.json").write_text(json.dumps(meta))
    with pytest.raises(BitrayError, match="holds vectors of 'bit-s-r101x1@tfhub'"):
        search(str(copy), image=str(two_runs["changed"]))


def test_index_on_s3_beside_an_s3_output(two_runs, s3_bucket):
    from bitray.embed import run_embedding
    from bitray.search.index import load_index, update_index
    from bitray.search.query import search

    output = f"s3://{s3_bucket}/out"
    run_embedding(tiny_config([str(p) for p in two_runs["first"][:5]], output, run_id="s3-run"))
    report = update_index(output)
    assert report.index == f"{output}/_index" and report.count == 5
    index = load_index(report.index)
    assert index.meta.runs == ["s3-run"]
    result = search(index, path=str(two_runs["first"][0]), k=2)
    assert result.num_rows == 2 and str(two_runs["first"][0]) not in result.column("path").to_pylist()


def test_an_output_of_mixed_models_is_refused(two_runs, tmp_path):
    from bitray.embed import run_embedding
    from bitray.search.index import update_index

    output = tmp_path / "out"
    shutil.copytree(two_runs["output"], output)
    config = tiny_config(
        [str(two_runs["photos"])], str(output), incremental=True, run_id="run-c", image_size=40
    )
    with pytest.raises(
        BitrayError, match=r"--image-size 40x40 px \(the output's rows were made with 32x32 px\)"
    ):
        run_embedding(config)  # refused: the output stays one model's at one size (test_embed_settings.py)
    assert update_index(str(output), str(tmp_path / "index")).count == 13


def test_ivf_index_of_the_same_output_finds_the_exact_neighbours(two_runs, tmp_path):
    from bitray.search.index import IndexOptions, load_index, update_index
    from bitray.search.query import search

    report = update_index(str(two_runs["output"]), str(tmp_path / "ivf"), options=IndexOptions(exact_below=5))
    assert (report.kind, report.count) == ("ivf", 13)
    ivf, flat = load_index(str(tmp_path / "ivf")), load_index(str(two_runs["index"]))
    assert ivf.meta.nlist == 7 and ivf.meta.nprobe == 16  # every cell scanned: exact
    runs = dict(zip(ivf.rows.column("path").to_pylist(), ivf.rows.column("run_id").to_pylist(), strict=True))
    assert runs[str(two_runs["changed"])] == "run-b"
    for photo in two_runs["first"][:3]:
        want = search(flat, path=str(photo), k=5)
        got = search(ivf, path=str(photo), k=5)
        assert got.column("path").to_pylist() == want.column("path").to_pylist()


def test_cli_index_and_search_with_contact_sheet(two_runs, tmp_path, capsys):
    from bitray.cli import main
    from bitray.search.sheet import SheetLayout, thumbnail

    index = tmp_path / "cli-index"
    assert main(["index", "--embeddings", str(two_runs["output"]), "--index", str(index)]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 13

    query = two_runs["first"][2]
    sheet = tmp_path / "sheet.png"
    assert (
        main(
            [
                "search",
                "--index",
                str(index),
                "--path",
                str(query),
                "-k",
                "4",
                "--sheet",
                str(sheet),
                "--json",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["rank"] for r in rows] == [1, 2, 3, 4] and str(query) not in [r["path"] for r in rows]

    image = Image.open(sheet)
    layout = SheetLayout()
    assert image.format == "PNG" and image.size == layout.size(5) == (6 + 5 * 166, 6 + 196)
    pixels = np.asarray(image.convert("RGB"), np.int16)
    expected = [str(query), *(r["path"] for r in rows)]
    candidates = [str(p) for p in [*two_runs["first"], *two_runs["added"]]]
    for i, path in enumerate(expected):
        thumb = thumbnail(Path(path).read_bytes(), layout.thumb)
        left, top, right, bottom = layout.image_box(i, thumb.size)
        tile = pixels[top:bottom, left:right]
        assert np.array_equal(tile, np.asarray(thumb, np.int16)), path
        # the tile is this image and no other: compare with a plain Pillow resize of every candidate
        errors = {
            c: np.abs(tile - np.asarray(Image.open(c).convert("RGB").resize(thumb.size), np.int16)).mean()
            for c in candidates
        }
        assert min(errors, key=errors.get) == path

    assert main(["search", "--index", str(index), "--image", str(two_runs["changed"]), "-k", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].split()[2] == str(two_runs["changed"])
    assert main(["search", "--index", str(tmp_path / "none"), "--path", "x"]) == 2
    assert "no index at" in capsys.readouterr().err


def test_embed_config_index_switch_updates_the_index(two_runs, tmp_path, capsys):
    from bitray.cli import main
    from bitray.search.index import load_index

    photos = tmp_path / "photos"
    write_photos(photos, 3, seed=5)
    config = tmp_path / "embed.yaml"
    index = tmp_path / "idx"
    config.write_text(f"model: random:tiny\nimage_size: 32\nbatch_size: 4\nactors_max: 1\nindex: {index}\n")
    out = tmp_path / "out"
    argv = ["embed", "--config", str(config), "--input", str(photos), "--output", str(out), "--incremental"]
    assert main(argv) == 0
    assert load_index(str(index)).meta.count == 3
    write_photos(photos, 2, seed=6)
    assert main(argv) == 0
    assert "5 vectors, 2 added" in capsys.readouterr().out
    assert len(load_index(str(index)).meta.runs) == 2


def test_ivf_index_updated_incrementally_replaces_a_changed_object(tmp_path, ray_local):
    from bitray.embed import run_embedding
    from bitray.search.index import IndexOptions, load_index, update_index
    from bitray.search.query import search

    photos, output, index = tmp_path / "photos", tmp_path / "out", str(tmp_path / "index")
    first = write_photos(photos, 6, seed=3)
    run_embedding(tiny_config([str(photos)], str(output), incremental=True, run_id="one"))
    options = IndexOptions(exact_below=3)
    assert update_index(str(output), index, options=options).kind == "ivf"
    first[0].write_bytes(first[5].read_bytes())  # now the same picture as another one
    write_photos(photos, 2, seed=4)
    run_embedding(tiny_config([str(photos)], str(output), incremental=True, run_id="two"))
    report = update_index(str(output), index, options=options)
    assert (report.kind, report.rebuilt, report.count, report.added, report.replaced) == (
        "ivf",
        False,
        8,
        3,
        1,
    )
    loaded = load_index(index)
    assert loaded.meta.runs == ["one", "two"] and loaded.meta.trained_on == 6
    result = search(loaded, path=str(first[5]), k=1)
    assert result.column("path")[0].as_py() == str(first[0])
    assert result.column("similarity")[0].as_py() == pytest.approx(1.0, abs=1e-5)
    assert result.column("run_id")[0].as_py() == "two"
