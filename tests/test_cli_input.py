"""Bad input to any ``bitray`` command: one message naming the input, exit 2, nothing started.

Fast: the indexes here are written directly (a few random vectors), no Ray and no TensorFlow, except the
``predict`` check, which loads a tiny model to show it stops before Ray.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from bitray.cli import build_parser, main
from bitray.errors import BitrayError

DIM = 8


def write_index(root: Path, count: int = 16, *, kind: str = "flat") -> Path:
    """An index of ``count`` small PNGs with random unit vectors (images 1 and 3 copy 0 and 2), as
    ``bitray index`` stores it."""
    from bitray.search.index import (
        ROWS_SCHEMA,
        IndexMeta,
        IndexOptions,
        SearchIndex,
        _Builder,
        exact_index,
        ivf_cells,
        trained_ivf,
    )

    rng = np.random.default_rng(0)
    photos = root / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = photos / f"{i:03d}.png"
        if i in (1, 3):
            path.write_bytes(Path(paths[i - 1]).read_bytes())
        else:
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    vectors = rng.normal(size=(count, DIM)).astype(np.float32)
    vectors[1], vectors[3] = vectors[0], vectors[2]
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(count, dtype=np.int64)
    nlist = ivf_cells(count)
    index = exact_index(DIM) if kind == "flat" else trained_ivf(vectors, nlist)
    index.add_with_ids(vectors, ids)
    rows = pa.table(
        {
            "id": ids,
            "path": paths,
            "etag": [None] * count,
            "size": [Path(p).stat().st_size for p in paths],
            "mtime": pa.array([0] * count, pa.timestamp("ns", tz="UTC")),
            "run_id": ["r"] * count,
            "width": pa.array([8] * count, pa.int32()),
            "height": pa.array([8] * count, pa.int32()),
        },
        schema=ROWS_SCHEMA,
    )
    ivf = kind == "ivf"
    meta = IndexMeta(
        embeddings=str(root / "out"),
        model_id="bit-tiny@random-init",
        model_spec="random:tiny",
        image_size=(32, 32),
        dim=DIM,
        kind=kind,
        runs=["r"],
        count=0,
        next_id=count,
        generation="",
        nlist=nlist if ivf else None,
        nprobe=2 if ivf else None,
        trained_on=count if ivf else None,
    )
    uri = root / "index"
    _Builder(str(root / "out"), str(uri), None, IndexOptions()).store(
        SearchIndex(str(uri), meta, index, rows), None
    )
    return uri


def walk(parser: argparse.ArgumentParser, name: str = "bitray"):
    """(command, parser) of every parser under ``parser``, subcommands of subcommands included."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, child in action.choices.items():
                yield from walk(child, f"{name} {sub}")


def test_every_numeric_flag_of_every_command_has_a_range_checked_type():
    from bitray.cli.args import Bounded

    numeric, unchecked = [], []
    for command, parser in walk(build_parser()):
        for action in parser._actions:
            default = action.default
            is_number = action.type in (int, float) or isinstance(action.type, Bounded)
            if isinstance(default, int | float) and not isinstance(default, bool) and action.nargs != 0:
                is_number = True
            if is_number:
                numeric.append(f"{command} {action.option_strings}")
                if not isinstance(action.type, Bounded):
                    unchecked.append(numeric[-1])
    assert not unchecked, f"numeric flags without a range-checked type (bitray.cli.args): {unchecked}"
    assert len(numeric) >= 25  # the walk reached every command


BAD_FLAGS = [
    (["evaluate", "--embeddings", "e", "--labels", "l", "--folds", "1"], "--folds", ">= 2"),
    (["evaluate", "--embeddings", "e", "--labels", "l", "--few-shot", "-1"], "--few-shot", ">= 1"),
    (["evaluate", "--embeddings", "e", "--labels", "l", "--few-shot", "0"], "--few-shot", ">= 1"),
    (["evaluate", "--embeddings", "e", "--labels", "l", "--seed", "-1"], "--seed", "in [0,"),
    (["evaluate", "--embeddings", "e", "--labels", "l", "--tolerance", "nan"], "--tolerance", "in [0, 1]"),
    (["index", "--embeddings", "e", "--nprobe", "-3"], "--nprobe", ">= 1"),
    (["index", "--embeddings", "e", "--exact-below", "0"], "--exact-below", ">= 1"),
    (["search", "--index", "i", "--path", "p", "--nprobe", "-7"], "--nprobe", ">= 1"),
    (["search", "--index", "i", "--path", "p", "-k", "0"], "-k", ">= 1"),
    (["duplicates", "--index", "i", "--output", "o.parquet", "--threshold", "1.5"], "--threshold", "[-1, 1]"),
    (["errors", "out", "--limit", "-1"], "--limit", ">= 0"),
    (["embed", "--batch-size", "0"], "--batch-size", ">= 1"),
    (["embed", "--actors", "4:2"], "--actors", "MIN <= MAX"),
    (["embed", "--cpus-per-actor", "0"], "--cpus-per-actor", "> 0"),
    (["embed", "--image-size", "16"], "--image-size", ">= 32"),
    (["finetune", "--steps", "1"], "--steps", ">= 2"),
    (["predict", "--model", "m", "--output", "o", "--top-k", "0"], "--top-k", ">= 1"),
    (["schedule", "--cron", "* * * * *", "--config", "c", "--poll", "0"], "--poll", "> 0"),
    (["model", "info", "random:tiny", "--num-classes", "-2"], "--num-classes", ">= 1"),
]


@pytest.mark.parametrize(
    ("argv", "flag", "rule"), BAD_FLAGS, ids=[" ".join(a[:1] + a[-2:]) for a, _, _ in BAD_FLAGS]
)
def test_a_number_out_of_range_is_one_line_naming_the_flag(argv, flag, rule, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"argument {flag}" in err and rule in err, err
    assert err.startswith(f"bitray {argv[0]}") and "Traceback" not in err


def test_search_k_beyond_the_index_returns_the_whole_index(tmp_path, capsys):
    uri = write_index(tmp_path)
    assert main(["search", "--index", str(uri), "--path", str(tmp_path / "photos" / "000.png"), "-k",
                 "3000000000", "--json"]) == 0  # fmt: skip
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 15 and rows[0]["path"].endswith("001.png")  # all but the query; its copy first


def test_nprobe_is_checked_by_the_library_too(tmp_path):
    from bitray.search.index import IndexOptions, load_index

    with pytest.raises(BitrayError, match="nprobe -3"):
        IndexOptions(nprobe=-3)
    with pytest.raises(BitrayError, match="exact_below 0"):
        IndexOptions(exact_below=0)
    index = load_index(str(write_index(tmp_path, 64, kind="ivf")))
    with pytest.raises(BitrayError, match="nprobe -7"):
        index.search(np.ones((1, DIM), np.float32), 5, nprobe=-7)
    sims, ids = index.search(np.ones((1, DIM), np.float32), 5, nprobe=100)  # more cells than it has: all
    assert ids.shape == (1, 5) and (ids >= 0).all()


CORRUPT = {
    "not json": lambda meta: "{not json",
    "a list": lambda meta: "[]",
    "a key missing": lambda meta: json.dumps({k: v for k, v in meta.items() if k != "generation"}),
    "a negative nprobe": lambda meta: json.dumps({**meta, "nprobe": -3}),
    "an unknown kind": lambda meta: json.dumps({**meta, "kind": "hnsw"}),
    "a wrong type": lambda meta: json.dumps({**meta, "dim": "eight"}),
    "a wrong count": lambda meta: json.dumps({**meta, "count": 99}),
}


@pytest.mark.parametrize("damage", sorted(CORRUPT))
def test_a_corrupt_index_json_is_one_message_naming_the_file_and_the_fix(damage, tmp_path, capsys):
    uri = write_index(tmp_path)
    meta = json.loads((uri / "index.json").read_text())
    (uri / "index.json").write_text(CORRUPT[damage](meta))
    for argv in (["search", "--index", str(uri), "--path", str(tmp_path / "photos" / "000.png")],
                 ["duplicates", "--index", str(uri), "--output", str(tmp_path / "d.parquet")]):  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{uri}/index.json is not a valid bitray index" in err, err
        assert "rebuild it with bitray index --embeddings OUT --index" in err


def test_evaluation_of_one_class_says_so(tmp_path):
    from bitray.search.evaluate import EvalOptions, LabelledVectors, score

    one_class = LabelledVectors([f"p{i}" for i in range(7)], np.eye(7, DIM, dtype=np.float32),
                                np.zeros(7, np.int64), ["a"], "m", 0)  # fmt: skip
    with pytest.raises(BitrayError) as info:
        score("out", "labels.csv", one_class)
    assert "all of one class ('a')" in str(info.value) and "has 7" not in str(info.value)
    for bad in ({"folds": 1}, {"few_shot": 0}, {"few_shot": -1}):
        with pytest.raises(BitrayError):
            EvalOptions(**bad)


@pytest.mark.slow
def test_predict_refuses_a_model_without_a_head_before_starting_ray(tmp_path):
    (tmp_path / "in").mkdir()
    Image.new("RGB", (40, 40)).save(tmp_path / "in" / "a.png")
    code = (
        "import sys; from bitray.cli import main\n"
        f"rc = main(['predict', '--model', 'random:tiny', '--input', {str(tmp_path / 'in')!r}, '--output', "
        f"{str(tmp_path / 'out')!r}, '--image-size', '32'])\n"
        "print(rc, 'ray' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout.split() == ["2", "False"], done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("bitray")]
    assert len(errors) == 1 and "has no classifier head" in errors[0] and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_arrow_reads_index_rows_and_label_manifests_from_its_own_buffers(tmp_path, monkeypatch):
    """The condition of the exit abort (below), checked deterministically: Arrow is never handed a Python
    file object to read index rows or a label manifest from."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from bitray.finetune.data import list_labelled
    from bitray.search.index import load_index

    sources = []

    def recording(read):  # noqa: ANN001, ANN202
        return lambda source, *args, **kwargs: sources.append(type(source)) or read(source, *args, **kwargs)

    monkeypatch.setattr(pq, "read_table", recording(pq.read_table))
    monkeypatch.setattr(pacsv, "read_csv", recording(pacsv.read_csv))
    load_index(str(write_index(tmp_path)))
    pq.write_table(pa.table({"path": ["a.png"], "label": ["x"]}), tmp_path / "labels.parquet")
    (tmp_path / "labels.csv").write_text("path,label\na.png,x\n")
    for name in ("labels.parquet", "labels.csv"):
        assert [label for _, label in list_labelled(str(tmp_path / name))] == ["x"]
    assert len(sources) == 3 and all(issubclass(s, pa.NativeFile) for s in sources), sources
    assert not any(issubclass(s, pa.PythonFile) for s in sources)


def test_duplicates_exits_0_every_time(tmp_path):
    """Ten runs of the command in fresh processes: none may abort at exit.

    The abort was an Arrow I/O thread: ``load_index`` gave Arrow an ``io.BytesIO``, the Parquet reader's
    read-ahead cache held buffers of Python bytes, and when its last reference went on that thread after
    the interpreter had begun to shut down, ``~PyBuffer`` asked for the GIL, CPython ended the thread
    (``pthread_exit``) inside a noexcept destructor, and libstdc++ called ``std::terminate``. On a 2-core
    machine a read then exit hit it 8 times in 200; rare in this command, so this test guards the fix
    (``pa.BufferReader``) rather than reproducing the race every time."""
    uri = write_index(tmp_path)
    command = [sys.executable, "-m", "bitray", "duplicates", "--index", str(uri), "--output",
               str(tmp_path / "dups.parquet"), "--sheet", str(tmp_path / "dups.png")]  # fmt: skip
    for _ in range(10):
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        # The synthetic index's output has no finished runs, so no input prefix is recorded and the reads
        # that confirm exact copies are refused (``bitray.search.scope``): the groups are still found.
        assert "2 group(s), 4 image(s), 0 exact copies" in done.stdout
