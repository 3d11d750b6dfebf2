"""The compressed, sharded index on real Ray over synthetic outputs laid out like real ones: parallel build,
kill and resume, incremental add/change/delete, retraining, concurrent updates, service and cold queries,
duplicates confirmed exactly, and a budget that forces compression."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from bitray.errors import BitrayError

DIM = 64
COUNT = 4000
ROWS_PER_FILE = 250  # 16 files
PATHS = [f"/photos/{i:05d}.jpg" for i in range(COUNT)]


def options(**kw):  # noqa: ANN201
    from bitray.search.index import IndexOptions

    base = dict(exact_below=1000, max_index_memory=COUNT * 48, files_per_shard=4)
    return IndexOptions(**{**base, **kw})


def base_vectors() -> np.ndarray:
    from bitray.search.synthetic import Realistic

    x, _ = Realistic(DIM, rank=32, clusters=40, seed=1).draw(COUNT, np.random.default_rng(1))
    # planted: 1 and 2 exact copies of 0; 11 a near copy of 10
    x[1] = x[2] = x[0]
    near = x[10] + np.random.default_rng(2).standard_normal(DIM).astype(np.float32) * 0.005
    x[11] = near / np.linalg.norm(near)
    return x


def write(output: Path, run: str, paths: list[str], x: np.ndarray, deleted: list[str] | None = None) -> None:
    from bitray.search.synthetic import batches_of, write_run

    batches = batches_of(paths, x, ROWS_PER_FILE)
    write_run(str(output), run, batches, rows_per_file=ROWS_PER_FILE, deleted=deleted)


def brute(x: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    sims = queries @ x.T
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def live_ids(index) -> np.ndarray:  # noqa: ANN001
    return index.rows.column("id").to_numpy()


@pytest.fixture(scope="module")
def built(tmp_path_factory, ray_local) -> dict:
    from bitray.search.index import update_index

    root = tmp_path_factory.mktemp("shards")
    x = base_vectors()
    write(root / "out", "a", PATHS, x)
    report = update_index(str(root / "out"), str(root / "index"), options=options())
    return {"root": root, "x": x, "out": root / "out", "index": root / "index", "report": report}


def test_budget_chooses_the_kind_and_100m_fits_160_bytes_a_vector():
    from bitray.search.params import choose, parse_memory

    assert parse_memory("16G") == 16 * 2**30 and parse_memory("512MiB") == 512 * 2**20
    assert choose(100, 2048, 2**30, 20_000).kind == "flat"
    assert choose(100_000, 2048, 2**31, 20_000).kind == "ivf"
    big = choose(100_000_000, 2048, parse_memory("16G"), 20_000)
    assert big.kind == "ivfpq" and big.bytes_per_vector <= 160 and big.train_size <= 32_768
    with pytest.raises(BitrayError, match="cannot hold"):
        choose(100_000_000, 2048, parse_memory("1G"), 20_000)


@pytest.mark.slow
def test_a_budget_that_forces_compression_builds_shards_in_parallel(built, tmp_path):
    from bitray.search.index import load_index, update_index

    report = built["report"]
    assert (report.kind, report.count, report.added, report.rebuilt) == ("ivfpq", COUNT, COUNT, True)
    index = load_index(str(built["index"]))
    assert index.meta.factory.startswith("PCAR") and "PQ32" in index.meta.factory
    assert len(index.meta.shards) == 4 and [s["count"] for s in index.meta.shards] == [1000] * 4
    assert index.code_size == 32  # bytes a vector in memory, besides its id: 1/8 of its float32 bytes
    ids = live_ids(index)
    assert len(ids) == len(set(ids)) == COUNT
    assert sorted(index.rows.column("path").to_pylist()) == PATHS
    # recall@10 against brute force on queries from the index
    x = built["x"]
    queries = x[::40]
    sims, found = index.search(queries, 10)
    rows = index.rows_of(found.ravel())
    got = np.array([PATHS.index(p) for p in rows.column("path").to_pylist()]).reshape(found.shape)
    truth = brute(x, queries, 10)
    recall = np.mean([len(set(g) & set(t)) / 10 for g, t in zip(got, truth, strict=True)])
    assert recall >= 0.8
    _, reranked = index.search(queries, 10, rerank=50)
    rows = index.rows_of(reranked.ravel())
    got = np.array([PATHS.index(p) for p in rows.column("path").to_pylist()]).reshape(found.shape)
    assert np.mean([len(set(g) & set(t)) / 10 for g, t in zip(got, truth, strict=True)]) >= recall
    # a generous budget keeps full vectors (IVF-Flat) for the same output
    assert (
        update_index(str(built["out"]), str(tmp_path / "ivf"), options=options(max_index_memory=2**30)).kind
        == "ivf"
    )


@pytest.mark.slow
def test_a_killed_build_resumes_without_adding_a_vector_twice(built, tmp_path, ray_local, monkeypatch):
    import ray

    from bitray import testhooks
    from bitray.search.index import load_index, update_index

    index = tmp_path / "index"
    marker = tmp_path / "task-crashed"
    code = (
        "import ray, sys; from bitray.search.index import IndexOptions, update_index\n"
        f"ray.init(address={ray.get_runtime_context().gcs_address!r})\n"
        f"update_index({str(built['out'])!r}, {str(index)!r}, options=IndexOptions(exact_below=1000, "
        f"max_index_memory={COUNT * 48}, files_per_shard=2))\n"
    )
    env = {**os.environ, testhooks.INDEX_KILL_AFTER: "3", testhooks.SHARD_CRASH: str(marker)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, done.stderr[-2000:]
    assert not (index / "index.json").exists()
    committed = {p.name: p.stat().st_mtime_ns for p in (index / "shards").glob("*.json")}
    assert 3 <= len(committed) <= 8

    # shard 1's task dies once, before its commit: in the killed build, or else in this one (Ray reruns it)
    monkeypatch.setenv(testhooks.SHARD_CRASH, str(marker))
    report = update_index(str(built["out"]), str(index), options=options(files_per_shard=2))
    assert marker.exists()
    assert (report.count, report.added) == (COUNT, COUNT)
    after = {p.name: p.stat().st_mtime_ns for p in (index / "shards").glob("*.json")}
    assert all(after[name] == mtime for name, mtime in committed.items())  # reused, not rebuilt
    loaded = load_index(str(index))
    ids = live_ids(loaded)
    assert len(ids) == len(set(ids)) == COUNT and len(loaded.meta.shards) == 8
    assert sorted(loaded.rows.column("path").to_pylist()) == PATHS
    assert len(list(index.glob("trained-*.faiss"))) == 1


@pytest.mark.slow
def test_incremental_add_change_delete_and_retrain_policy(built, tmp_path):
    import shutil

    from bitray.search.index import load_index, update_index
    from bitray.search.query import search
    from bitray.search.synthetic import Realistic

    out, index = tmp_path / "out", tmp_path / "index"
    shutil.copytree(built["out"], out)
    shutil.copytree(built["index"], index)
    index_json = json.loads((index / "index.json").read_text())
    index_json["embeddings"] = str(out)
    (index / "index.json").write_text(json.dumps(index_json))
    x = built["x"]
    rng = np.random.default_rng(5)
    added, _ = Realistic(DIM, rank=32, clusters=40, seed=1).draw(200, rng)
    changed = [PATHS[i] for i in range(100, 150)]
    new_vectors = np.concatenate([added, x[3000:3050]])  # the changed objects now look like others
    deleted = {PATHS[i] for i in range(200, 210)}
    write(out, "b", [f"/photos/new-{i}.jpg" for i in range(200)] + changed, new_vectors, sorted(deleted))
    report = update_index(str(out), str(index), options=options())
    assert (report.rebuilt, report.added, report.replaced, report.new_runs) == (False, 250, 60, ["b"])
    assert report.count == COUNT + 200 - 10
    loaded = load_index(str(index))
    assert loaded.meta.template == index_json["template"]  # not retrained
    assert [s["number"] for s in loaded.meta.shards] == [0, 1, 2, 3, 4]
    assert len(list(index.glob("masked-*.npy"))) == 2  # this generation's and the previous one's
    paths = loaded.rows.column("path").to_pylist()
    assert len(paths) == len(set(paths)) == report.count and not deleted & set(paths)
    runs = dict(zip(paths, loaded.rows.column("run_id").to_pylist(), strict=True))
    assert {runs[p] for p in changed} == {"b"}
    # the changed objects' old vectors and the deleted objects are never returned
    sims, ids = loaded.search(np.concatenate([x[100:150], x[200:210]]), 5)
    rows = loaded.rows_of(ids.ravel())
    hits = list(zip(rows.column("path").to_pylist(), rows.column("run_id").to_pylist(), strict=True))
    assert not [h for h in hits if h[0] in deleted or (h[0] in changed and h[1] == "a")]
    result = search(loaded, path=changed[0], k=3)
    assert result.column("path")[0].as_py() == PATHS[3000]

    # retraining: vectors from another distribution fit the quantiser badly
    other, _ = Realistic(DIM, rank=32, clusters=40, seed=99).draw(500, rng)
    write(out, "c", [f"/other/{i}.jpg" for i in range(500)], other)
    report = update_index(str(out), str(index), options=options())
    assert report.rebuilt and report.count == COUNT + 200 - 10 + 500  # deletions are recorded: kept
    retrained = load_index(str(index))
    assert retrained.meta.template != index_json["template"]
    assert not deleted & set(retrained.rows.column("path").to_pylist())
    assert len(list(index.glob("trained-*.faiss"))) == 1


@pytest.mark.slow
def test_concurrent_updates_one_wins_the_other_fails_and_leaves_nothing(built, tmp_path):
    import shutil

    from bitray.search import build
    from bitray.search.commit import CommitConflict
    from bitray.search.index import load_index, update_index
    from bitray.search.params import choose

    out, index = tmp_path / "out", tmp_path / "index"
    shutil.copytree(built["out"], out)
    shutil.copytree(built["index"], index)
    meta = json.loads((index / "index.json").read_text())
    meta["embeddings"] = str(out)
    (index / "index.json").write_text(json.dumps(meta))
    stale = json.loads((index / "index.json").read_text())
    write(out, "b", ["/photos/b.jpg"], built["x"][:1] * 0 + built["x"][5])
    update_index(str(out), str(index), options=options())  # the winner
    before = sorted(p.name for p in index.rglob("*") if p.is_file())
    write(out, "c", ["/photos/c.jpg"], built["x"][6:7])
    params = choose(COUNT, DIM, COUNT * 48, 0, compressed=True)
    with pytest.raises(CommitConflict, match="updated by another bitray index"):
        build.update_sharded(
            str(out), str(index), stale, ["a", "b", "c"], ["b", "c"], params, files_per_shard=4
        )
    assert sorted(p.name for p in index.rglob("*") if p.is_file()) == before  # no orphans
    assert load_index(str(index)).meta.runs == ["a", "b"]


@pytest.mark.slow
def test_query_through_the_service_and_cold(built, capsys, ray_local):
    import ray

    from bitray.cli import main
    from bitray.search.index import load_index
    from bitray.search.query import search
    from bitray.search.service import SearchService

    cold = load_index(str(built["index"]))
    queries = built["x"][:20]
    want = cold.search(queries, 10)
    address = ray.get_runtime_context().gcs_address
    argv = [
        "search",
        "--index",
        str(built["index"]),
        "--path",
        PATHS[10],
        "-k",
        "3",
        "--json",
        "--address",
        address,
    ]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "no search service" in captured.err
    cold_rows = [json.loads(line) for line in captured.out.splitlines()]
    service = SearchService.start(str(built["index"]), actors=2)
    try:
        assert service.info["actors"] == 2 and service.info["shards"] == 4
        sims, ids = service.search(queries, 10)
        np.testing.assert_array_equal(ids, want[1])
        np.testing.assert_allclose(sims, want[0], atol=1e-5)
        assert search(service, path=PATHS[10], k=3).column("path").to_pylist()[0] == PATHS[11]
        assert main(argv) == 0
        captured = capsys.readouterr()
        assert "no search service" not in captured.err
        assert [json.loads(line) for line in captured.out.splitlines()] == cold_rows
    finally:
        service.stop()
    assert SearchService.connect(str(built["index"])) is None


@pytest.mark.slow
def test_duplicates_on_the_compressed_index_match_exact_search(built, tmp_path):
    from bitray.search.duplicates import DuplicateOptions, find_duplicates
    from bitray.search.index import load_index

    x = built["x"]
    threshold = 0.995
    sims = x @ x.T
    truth = {(PATHS[a], PATHS[b]) for a, b in zip(*np.nonzero(np.triu(sims >= threshold, 1)), strict=True)}
    assert {(PATHS[0], PATHS[1]), (PATHS[10], PATHS[11])} <= truth
    table = find_duplicates(load_index(str(built["index"])), DuplicateOptions(threshold))
    groups: dict[int, list[str]] = {}
    for group, path in zip(table.column("group").to_pylist(), table.column("path").to_pylist(), strict=True):
        groups.setdefault(group, []).append(path)
    found = {(a, b) for members in groups.values() for a in members for b in members if a < b}
    assert found >= truth
    exact = dict(zip(table.column("path").to_pylist(), table.column("exact").to_pylist(), strict=True))
    assert exact[PATHS[1]] or exact[PATHS[0]]
    pq.write_table(table, tmp_path / "d.parquet")


def test_cli_refuses_a_bad_budget(tmp_path, capsys):
    from bitray.cli import main

    assert main(["index", "--embeddings", str(tmp_path), "--max-index-memory", "lots"]) == 2
    assert "--max-index-memory 'lots': give a size such as 4G" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["search-service", "--help"])
    assert info.value.code == 0


def copy_built(built: dict, root: Path) -> tuple[Path, Path]:
    import shutil

    out, index = root / "out", root / "index"
    shutil.copytree(built["out"], out)
    shutil.copytree(built["index"], index)
    meta = json.loads((index / "index.json").read_text())
    meta["embeddings"] = str(out)
    (index / "index.json").write_text(json.dumps(meta))
    return out, index


@pytest.mark.slow
def test_small_shards_from_updates_are_merged_dropping_masked_ids(built, tmp_path, monkeypatch):
    from bitray.search import merge
    from bitray.search.index import load_index, update_index
    from bitray.search.synthetic import Realistic

    x = built["x"]
    extra, _ = Realistic(DIM, rank=32, clusters=40, seed=1).draw(120, np.random.default_rng(7))
    runs = {  # three small runs: the second changes an object of the first (masked, then dropped)
        "b": ([f"/photos/b-{i}.jpg" for i in range(40)] + [PATHS[5]], np.concatenate([extra[:40], x[6:7]])),
        "c": (
            [f"/photos/c-{i}.jpg" for i in range(40)] + ["/photos/b-0.jpg"],
            np.concatenate([extra[40:80], x[7:8]]),
        ),
        "d": ([f"/photos/d-{i}.jpg" for i in range(40)], extra[80:]),
    }
    loaded = {}
    for name, merge_at in (("kept", 99), ("merged", 3)):
        monkeypatch.setattr(merge, "MERGE_AT", merge_at)
        out, index = copy_built(built, tmp_path / name)
        for run, (paths, vecs) in runs.items():
            write(out, run, paths, vecs)
            update_index(str(out), str(index), options=options())
        loaded[name] = load_index(str(index))
    kept, merged = loaded["kept"], loaded["merged"]
    assert [s["number"] for s in kept.meta.shards] == [0, 1, 2, 3, 4, 5, 6]
    assert [s["number"] for s in merged.meta.shards] == [0, 1, 2, 3, 7]
    assert merged.meta.shards[-1]["count"] == 120 + 2 - 1  # b-0's first version dropped
    assert merged.meta.count == kept.meta.count == COUNT + 120
    assert not np.any(np.isin(merged.masked >> 32, [4, 5, 6]))  # the merged shards' masked ids are gone
    assert len(merged.masked) == 1  # PATHS[5]'s first version, in a large shard: still masked
    names = {p.name.split(".")[0] for p in (tmp_path / "merged" / "index" / "shards").iterdir()}
    assert names == {s["name"] for s in merged.meta.shards}  # the small shards' files removed
    paths = merged.rows.column("path").to_pylist()
    assert len(paths) == len(set(paths)) == COUNT + 120
    # the codes were copied, not re-encoded: the same answers with the same similarities
    queries = np.concatenate([x[::200], extra[::10]])
    sims_k, ids_k = kept.search(queries, 10)
    sims_m, ids_m = merged.search(queries, 10)
    np.testing.assert_allclose(sims_m, sims_k, atol=1e-5)
    path_k = kept.rows_of(ids_k.ravel()).column("path").to_pylist()
    assert merged.rows_of(ids_m.ravel()).column("path").to_pylist() == path_k


@pytest.mark.slow
def test_the_service_follows_an_update_without_a_restart(built, tmp_path, ray_local):
    import time

    import ray

    from bitray.search.index import update_index
    from bitray.search.service import SearchService

    out, index = copy_built(built, tmp_path)
    x = built["x"]
    service = SearchService.start(str(index), actors=1, follow_s=0.5)
    try:
        first = service.info["generation"]
        servers = ray.get(service.handle.shard_servers.remote())
        assert PATHS[20] in top(service, x[20])
        write(out, "b", ["/photos/moved.jpg"], x[20:21], deleted=[PATHS[20]])
        update_index(str(out), str(index), options=options())
        time.sleep(0.6)
        found = top(service, x[20])  # looks at index.json: a new generation, loaded
        assert "/photos/moved.jpg" in found and PATHS[20] not in found
        info = ray.get(service.handle.info.remote())
        assert info["generation"] != first and info["shards"] == 5
        assert ray.get(service.handle.shard_servers.remote()) != servers  # the old ones retired
    finally:
        service.stop()

    # throttled: without the wait it keeps serving what it has, unless the caller names a newer generation
    service = SearchService.start(str(index), actors=1, follow_s=3600)
    try:
        write(out, "c", ["/photos/again.jpg"], x[30:31], deleted=[PATHS[30]])
        report = update_index(str(out), str(index), options=options())
        assert PATHS[30] in top(service, x[30])
        generation = json.loads((index / "index.json").read_text())["generation"]
        assert report.count == COUNT
        found = top(service, x[30], generation=generation)
        assert "/photos/again.jpg" in found and PATHS[30] not in found
    finally:
        service.stop()


def top(service, vector: np.ndarray, **kw) -> list[str]:  # noqa: ANN001
    _, ids = service.search(vector[None], 3, **kw)
    return service.rows_of(ids[0][ids[0] >= 0]).column("path").to_pylist()
