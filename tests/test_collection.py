"""Collections (``bitray.collection``): versions of an output, one current, switched by a conditional write.

Outputs are synthetic finished runs (``bitray.search.synthetic``), read by the real readers, index and
evaluation; the gate logs to a real MLflow sqlite store; one test runs the switch on a moto S3 server.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bitray import outputs, storage
from bitray.cli import main
from bitray.collection import Collection, SwitchConflict, following, migrated_root
from bitray.config import EmbedConfig
from bitray.search.synthetic import batches_of, write_run

CLASSES, PER_CLASS, DIM = 4, 10, 16
PATHS = [f"/data/c{c}/img{i}.png" for c in range(CLASSES) for i in range(PER_CLASS)]


def vectors(paths: list[str], good: bool, seed: int) -> np.ndarray:
    """Vectors that separate the classes (``good``: class centres plus a little noise) or random ones."""
    noise = np.random.default_rng(seed).standard_normal((len(paths), DIM)).astype(np.float32)
    if not good:
        return noise
    centres = np.eye(CLASSES, DIM, dtype=np.float32) * 4
    return centres[[int(p.split("/")[2][1:]) for p in paths]] + 0.3 * noise


def embed(output: str, run: str, model_id: str, *, good: bool = True, extra: bool = False) -> None:
    """A finished synthetic run of the labelled images (and one more, ``new.png``, if ``extra``): good
    vectors are the same in every output, so two good versions score alike."""
    paths = PATHS + (["/data/c0/new.png"] if extra else [])
    write_run(output, run, batches_of(paths, vectors(paths, good, seed=1), 16), model_id=model_id)


@pytest.fixture()
def old_output(tmp_path) -> str:
    """An output made before collections: one finished run at ROOT, nothing else."""
    root = str(tmp_path / "emb")
    embed(root, "a", "bit-tiny@v1")
    return root


@pytest.fixture()
def labels(tmp_path) -> str:
    path = tmp_path / "labels.csv"
    path.write_text("path,label\n" + "".join(f"{p},{p.split('/')[2]}\n" for p in PATHS))
    return str(path)


def listing(root: str, capsys) -> dict:
    assert main(["outputs", root, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_an_output_made_before_collections_reads_as_a_collection_of_one(old_output, capsys):
    assert main(["outputs", old_output]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].split()[:4] == ["v0", "current", "40", "0"]
    assert f"current: {old_output}" in out and "bit-tiny@v1" in out
    assert not (Path(old_output) / "_bitray" / "current").exists()  # listing writes nothing
    assert outputs.finished_runs(old_output) == ["a"]
    assert main(["index", "--embeddings", old_output]) == 0
    assert (Path(old_output) / "_index" / "index.json").exists()  # where it always was
    capsys.readouterr()
    assert main(["search", "--index", old_output, "--path", PATHS[0], "-k", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["path"].startswith("/data/c0/")  # its nearest neighbour


def test_a_switch_is_one_conditional_write_that_readers_follow_at_once(old_output, capsys):
    assert main(["outputs", "add", old_output, "v2", "--model", "random:tiny"]) == 0
    v2 = str(Path(old_output) / "versions" / "v2")
    assert v2 in capsys.readouterr().out
    embed(v2, "b", "bit-tiny@v2", extra=True)
    assert outputs.finished_runs(old_output) == ["a"]  # not current yet
    rows = listing(old_output, capsys)
    assert [(r["name"], r["state"]) for r in rows["versions"]] == [("v0", "current"), ("v2", "backfilling")]

    assert main(["outputs", "switch", old_output, "v2", "--expect", "v9"]) == 2
    err = capsys.readouterr().err
    assert "current version is v0, not 'v9'" in err and len(err.strip().splitlines()) == 1
    assert main(["outputs", "switch", old_output, "v2", "--expect", "v0"]) == 0
    assert (Path(v2) / "_index" / "index.json").exists()  # built before the pointer moved
    capsys.readouterr()

    assert outputs.finished_runs(old_output) == ["b"]
    assert outputs.settings(old_output).model_id == "bit-tiny@v2"
    assert outputs.data_path(old_output) == v2
    assert outputs.finished_runs(v2) == ["b"]  # the version's own path reads the same
    rows = listing(old_output, capsys)
    assert rows["current"] == v2
    assert {r["name"]: (r["state"], r["model_id"], r["images"]) for r in rows["versions"]} == {
        "v0": ("complete", "bit-tiny@v1", 40),  # ROOT's own data, counted as itself
        "v2": ("current", "bit-tiny@v2", 41),
    }
    # only v2's index holds new.png: the search of ROOT found it there
    assert main(["search", "--index", old_output, "--path", "/data/c0/new.png", "-k", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["path"].startswith("/data/c0/")

    assert following(EmbedConfig(output=old_output)).output == v2  # bitray embed --output ROOT writes there

    with pytest.raises(SwitchConflict, match="not 'v0'"):  # a stale expectation, in the library
        Collection(old_output).switch("v0", expect="v0")


def test_retired_versions_are_deleted_only_by_gc_after_the_retention(old_output, capsys):
    collection = Collection(old_output)
    v2 = collection.add("v2", model="random:tiny").uri
    embed(v2, "b", "bit-tiny@v2")
    assert main(["outputs", "switch", old_output, "v2"]) == 0
    assert main(["outputs", "retire", old_output, "v2"]) == 2
    assert "switch to another first" in capsys.readouterr().err
    assert main(["outputs", "switch", old_output, "v0"]) == 0  # back to ROOT's own data
    assert outputs.finished_runs(old_output) == ["a"]
    assert main(["outputs", "retire", old_output, "v2"]) == 0
    assert main(["outputs", "gc", old_output, "--keep", "1d"]) == 0
    assert "nothing to delete" in capsys.readouterr().out and Path(v2).exists()
    assert [r["state"] for r in listing(old_output, capsys)["versions"]] == ["current", "retired"]
    assert main(["outputs", "gc", old_output, "--keep", "0"]) == 0
    assert "deleted v2" in capsys.readouterr().out
    assert not Path(v2).exists() and [r["name"] for r in listing(old_output, capsys)["versions"]] == ["v0"]
    assert main(["outputs", "gc", old_output, "--keep", "soon"]) == 2
    assert main(["outputs", "switch", old_output]) == 2
    assert main(["outputs", "switch", old_output, "v7"]) == 2
    assert "no version 'v7'" in capsys.readouterr().err


def test_the_gate_keeps_the_current_version_unless_the_new_one_is_as_good(
    old_output, labels, mlflow_tracking_uri, capsys
):
    from mlflow import MlflowClient

    collection = Collection(old_output)
    embed(collection.add("worse").uri, "w", "bit-tiny@worse", good=False)
    assert main(["outputs", "switch", old_output, "worse", "--labels", labels]) == 1
    assert "gate FAILED" in capsys.readouterr().out
    assert outputs.data_path(old_output) == old_output  # unswitched
    assert main(["outputs", old_output]) == 0
    out = capsys.readouterr().out
    assert "gate FAILED: " in out and "< v0's" in out and "(tolerance 0.01)" in out

    embed(collection.add("better").uri, "g", "bit-tiny@better")
    assert main(["outputs", "switch", old_output, "better", "--labels", labels]) == 0
    assert outputs.settings(old_output).model_id == "bit-tiny@better"

    capsys.readouterr()
    assert main(["evaluate", "--embeddings", old_output, "--labels", labels, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["new"]["embeddings"] == collection.current().uri

    client = MlflowClient(mlflow_tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("bitray-embed").experiment_id])
    verdicts = {r.data.params["version"]: r.data.tags["bitray.gate"] for r in runs}
    assert verdicts == {"worse": "fail", "better": "pass"}
    assert "linear_top1" in runs[0].data.metrics


def test_on_s3_a_switch_follows_refuses_a_stale_expectation_and_gc_deletes_v0(s3_bucket):
    root = f"s3://{s3_bucket}/emb"
    embed(root, "a", "bit-tiny@v1")
    collection = Collection(root)
    v2 = collection.add("v2").uri
    embed(v2, "b", "bit-tiny@v2")
    collection.update("v2", state="complete")
    assert outputs.finished_runs(root) == ["a"]
    assert collection.switch("v2", expect="v0").generation == 2
    assert outputs.finished_runs(root) == ["b"]
    with pytest.raises(SwitchConflict):
        collection.switch("v0", expect="v0")
    assert storage.exists(f"{root}/_bitray/current") and outputs.data_path(root) == v2
    assert main(["outputs", "retire", root, "v0"]) == 0 and main(["outputs", "gc", root, "--keep", "0"]) == 0
    assert outputs.versions(root)[0] == [{"name": "v2", "state": "current", "model": "random:tiny",
        "model_id": "bit-tiny@v2", "images": 40, "errors": 0, "gate": None, "data": v2}]  # fmt: skip
    assert not storage.list_names(f"{root}/embeddings") and outputs.finished_runs(root) == ["b"]


def test_the_serving_search_follows_a_switch_without_a_restart(old_output, capsys):
    """The serve app's search deployment (a plain class here) given a collection root serves the current
    version's index; a switch to a version of another model waits (pending) until the app's embedder has
    that model (``promote``): until then the old version is served whole, by path and by image."""
    from bitray.serve.search import SearchServer

    assert main(["index", "--embeddings", old_output]) == 0
    server = SearchServer(old_output, follow_s=0)
    new = "/data/c0/new.png"
    assert server.holds(PATHS[0]) and not server.holds(new)
    query = vectors([new], good=True, seed=1)[0]
    assert [n["path"] for n in server.by_vector(query, 3, "bit-tiny@v1")][0].startswith("/data/c0/")

    embed(Collection(old_output).add("v2").uri, "b", "bit-tiny@v2", extra=True)
    assert main(["outputs", "switch", old_output, "v2"]) == 0  # builds v2's index, then switches
    capsys.readouterr()
    described = server.describe()
    assert described["model"] == "bit-tiny@v1" and described["pending"]["model"] == "bit-tiny@v2"
    assert not server.holds(new) and server.by_vector(query, 3, "bit-tiny@v1")[0]["path"].startswith("/data/")
    assert server.refuse("bit-tiny@v2", "cannot load")["problem"] == "cannot load"  # still v1, and why
    assert server.by_path(PATHS[0], 1)[0]["path"].startswith("/data/c0/")

    described = server.promote("bit-tiny@v2")  # the embedder holds v2's model now
    assert described["model"] == "bit-tiny@v2" and described["pending"] is None and not described["problem"]
    assert described["since"] > 0 and described["index"].endswith("versions/v2/_index")
    assert server.holds(new) and server.by_path(new, 1)[0]["path"].startswith("/data/c0/")
    reason = server.by_vector(query, 3, "bit-tiny@v1")  # a query embedded just before the promotion
    assert isinstance(reason, str) and "'bit-tiny@v2'" in reason
    assert server.by_vector(query, 3, "bit-tiny@v2")[0]["path"].startswith("/data/c0/")

    assert main(["outputs", "switch", old_output, "v0"]) == 0  # back again, before any promotion
    assert server.describe()["pending"]["model"] == "bit-tiny@v1"
    assert main(["outputs", "switch", old_output, "v2"]) == 0
    assert server.describe()["pending"] is None  # the switch back was undone before the app took it

    collection = Collection(old_output)
    embed(collection.add("v3").uri, "c", "bit-tiny@v2")
    collection.update("v3", state="complete")
    collection.switch("v3")  # by hand, before its index was built: v2's stays served
    assert server.describe()["index"].endswith("versions/v2/_index") and server.holds(new)


def rows_of(output: str) -> list[tuple]:
    """The (path, run, vector) rows of an output's own files, sorted, read with pyarrow alone."""
    import pyarrow.dataset as ds

    fs, path = storage.filesystem_for(storage.join(output, "embeddings"))
    table = ds.dataset(path, filesystem=fs, format="parquet").to_table(
        columns=["path", "run_id", "embedding"]
    )
    return sorted(zip(*(table.column(c).to_pylist() for c in table.column_names), strict=True))


def test_migrate_gives_v0_a_path_of_its_own(old_output, capsys):
    """Copy, verify, one conditional write of v0's record, delete: readers never lose or see twice a row;
    a run in progress (the output's lock) or an unfinished run refuses it; running it again is harmless."""
    from bitray.locks import open_lock

    root, target = Path(old_output), Path(old_output) / "versions" / "v0"
    assert main(["index", "--embeddings", old_output]) == 0
    v0_rows = rows_of(old_output)
    embed(Collection(old_output).add("v2").uri, "b", "bit-tiny@v2", extra=True)
    assert main(["outputs", "switch", old_output, "v2"]) == 0
    (target / "embeddings").mkdir(parents=True)  # the leftovers of a migration killed while copying
    (target / "embeddings" / "part-x-000000.parquet").write_bytes(b"partial")

    with open_lock(str(root / "_bitray" / "lock"), "a-run", storage=EmbedConfig().storage, ttl_s=60):
        capsys.readouterr()
        assert main(["outputs", "migrate", old_output]) == 2
    err = capsys.readouterr().err
    assert (
        "another bitray run is working on" in err and "migrate" in err and len(err.strip().splitlines()) == 1
    )
    (root / "_bitray" / "runs" / "c").mkdir()  # a run begun and killed, to be resumed at ROOT
    assert main(["outputs", "migrate", old_output]) == 2
    assert "unfinished run (c)" in capsys.readouterr().err
    (root / "_bitray" / "runs" / "c").rmdir()
    assert rows_of(old_output) == v0_rows and Collection(old_output).record("v0").data == "."  # untouched

    assert not migrated_root(old_output)
    assert main(["outputs", "migrate", old_output]) == 0
    assert migrated_root(old_output)  # a run planned at ROOT before the migration refuses to write there
    assert f"copied, verified and switched to {target}; index {target / '_index'}" in capsys.readouterr().out
    assert rows_of(str(target)) == v0_rows  # every row once: the partial leftover is gone
    assert not any((root / part).exists() for part in ("embeddings", "errors", "_index", "_bitray/state"))
    assert sorted(p.name for p in root.iterdir()) == ["_bitray", "versions"]
    rows = {r["name"]: (r["state"], r["images"], r["data"]) for r in listing(old_output, capsys)["versions"]}
    assert rows == {"v0": ("complete", 40, str(target)), "v2": ("current", 41, str(root / "versions" / "v2"))}
    assert outputs.finished_runs(old_output) == ["b"]  # the current version is untouched

    assert main(["outputs", "switch", old_output, "v0"]) == 0  # v0 reads from its own path now
    assert outputs.data_path(old_output) == str(target) and outputs.finished_runs(old_output) == ["a"]
    capsys.readouterr()
    assert main(["search", "--index", old_output, "--path", PATHS[0], "-k", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["path"].startswith("/data/c0/")  # v0's index, rebuilt there
    assert main(["outputs", "migrate", old_output]) == 0
    assert f"already at {target}" in capsys.readouterr().out
    assert main(["outputs", "migrate", str(root / "versions" / "none")]) == 2  # no output there
    assert "nothing to migrate" in capsys.readouterr().err


def test_on_s3_migrate_moves_v0_under_versions(s3_bucket, capsys):
    root = f"s3://{s3_bucket}/emb"
    embed(root, "a", "bit-tiny@v1")
    v0_rows = rows_of(root)
    collection = Collection(root)
    embed(collection.add("v2").uri, "b", "bit-tiny@v2")
    collection.update("v2", state="complete")
    collection.switch("v2")
    assert main(["outputs", "migrate", root]) == 0
    assert "copied, verified and switched to" in capsys.readouterr().out
    assert rows_of(f"{root}/versions/v0") == v0_rows
    assert storage.list_names(root) == ["_bitray", "versions"]
    assert not storage.list_names(f"{root}/_bitray/state") and not storage.list_names(f"{root}/_bitray/runs")
    collection.switch("v0")
    assert outputs.data_path(root) == f"{root}/versions/v0" and outputs.finished_runs(root) == ["a"]
