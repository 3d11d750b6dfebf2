"""Deletions without a list: an incremental embedding run records the objects its listing no longer has,
and the next ``bitray index`` stops returning them (flat and IVF-Flat here; compressed in
test_search_shards.py). A restored object is embedded and returned again; a run over other inputs
deletes nothing."""

from __future__ import annotations

import os

import pytest
from embed_fixtures import tiny_config, write_photos

pytestmark = pytest.mark.slow


def test_a_deleted_object_stops_being_returned_after_the_next_update(tmp_path, ray_local):
    from bitray import outputs
    from bitray.embed import run_embedding
    from bitray.embed.layout import OutputLayout
    from bitray.embed.params import RunParams
    from bitray.embed.run import dry_run_embedding
    from bitray.embed.state import IncrementalState, _compact, recorded_versions
    from bitray.search.index import IndexOptions, load_index, update_index
    from bitray.search.query import search

    photos, other, output = tmp_path / "photos", tmp_path / "other", tmp_path / "out"
    first = write_photos(photos, 6, seed=3)
    run_embedding(tiny_config([str(photos)], str(output), incremental=True, run_id="one"))
    indices = {"flat": str(tmp_path / "flat"), "ivf": str(tmp_path / "ivf")}
    opts = {"flat": IndexOptions(), "ivf": IndexOptions(exact_below=3)}
    for kind, index in indices.items():
        assert update_index(str(output), index, options=opts[kind]).kind == kind

    gone = first[1]
    data, stat = gone.read_bytes(), gone.stat()
    gone.unlink()
    # a run over other inputs deletes nothing: only the run's own inputs are compared
    write_photos(other, 1, seed=9)
    assert dry_run_embedding(tiny_config([str(other)], str(output), incremental=True)).counts.deleted == 0
    summary = run_embedding(tiny_config([str(photos)], str(output), incremental=True, run_id="two"))
    assert summary.inputs == 0
    layout = OutputLayout(str(output), None)
    assert RunParams.load(layout, "two").counts.deleted == 1
    assert list(outputs.deleted_paths(str(output), "two")) == [str(gone)]
    for kind, index in indices.items():
        report = update_index(str(output), index, options=opts[kind])
        assert (report.kind, report.rebuilt, report.count, report.replaced) == (kind, False, 5, 1)
        loaded = load_index(index)
        assert str(gone) not in loaded.rows.column("path").to_pylist()
        found = search(loaded, path=str(first[0]), k=6).column("path").to_pylist()
        assert len(found) == 4 and str(gone) not in found  # the 5 live ones but the query itself

    # restored as it was (same bytes, same mtime): new again, embedded and returned again
    gone.write_bytes(data)
    os.utime(gone, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    summary = run_embedding(tiny_config([str(photos)], str(output), incremental=True, run_id="three"))
    assert (summary.inputs, RunParams.load(layout, "three").counts.new) == (1, 1)
    for kind, index in indices.items():
        update_index(str(output), index, options=opts[kind])
        assert str(gone) in search(load_index(index), path=str(first[0]), k=6).column("path").to_pylist()
    # a rebuild from the Parquet applies the deletions in run order too
    assert update_index(str(output), str(tmp_path / "fresh")).count == 6

    # compaction keeps what the tombstones say: the restored version once, nothing of the deleted one
    state = IncrementalState.load(layout)
    before = list(recorded_versions(layout, state))
    assert [p for p, _ in before].count(str(gone)) == 1
    assert list(recorded_versions(layout, _compact(layout, state, None))) == before
