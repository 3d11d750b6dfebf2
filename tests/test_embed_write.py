"""The writer stage on its own (no Ray): a block of actor output -> staged files + one receipt."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bitray.config import StorageConfig
from bitray.embed.commit import Receipt, publisher_for
from bitray.embed.layout import OutputLayout
from bitray.embed.write import write_files

DIM = 4


def actor_block(rows: list[int], failed: set[int]) -> pa.Table:
    """What ``EmbedActor`` returns for ``rows``: the ones in ``failed`` as error rows (null embedding)."""
    ok = np.array([r not in failed for r in rows])
    vectors = np.arange(len(rows) * DIM, dtype=np.float32)
    return pa.table(
        {
            "row": pa.array(rows, pa.int64()),
            "path": [f"/in/{r}.jpg" for r in rows],
            "etag": pa.array([None] * len(rows), pa.string()),
            "size": pa.array([100 + r for r in rows], pa.int64()),
            "mtime_ns": pa.array([1_700_000_000_000_000_000] * len(rows), pa.int64()),
            "width": pa.array([40] * len(rows), pa.int32()),
            "height": pa.array([30] * len(rows), pa.int32()),
            "embedding": pa.FixedSizeListArray.from_arrays(vectors, DIM, mask=pa.array(~ok)),
            "model": ["m@test"] * len(rows),
            "stage": [None if r not in failed else "decode" for r in rows],
            "error": [None if r not in failed else "ValueError: bad" for r in rows],
        }
    )


def test_write_files_stages_results_and_errors_apart_and_names_their_rows(tmp_path):
    layout = OutputLayout(str(tmp_path / "out"), StorageConfig())
    out = write_files(actor_block([4, 5, 6, 9, 10], failed={6}), layout=layout, run_id="r1")
    receipt = Receipt.model_validate_json(out.column("receipt")[0].as_py())
    assert (receipt.ranges, receipt.embedded, receipt.errored, receipt.model) == (
        [(4, 7), (9, 11)],
        4,
        1,
        "m@test",
    )
    assert not (tmp_path / "out" / "embeddings").exists()  # staged only: nothing visible yet
    publisher = publisher_for(layout)
    assert all(publisher.publish(f) for f in receipt.files)
    files = {f.kind: pq.read_table(f.final) for f in receipt.files}
    assert files["embeddings"].column("path").to_pylist() == [
        "/in/4.jpg",
        "/in/5.jpg",
        "/in/9.jpg",
        "/in/10.jpg",
    ]
    assert files["embeddings"].schema.field("embedding").type == pa.list_(pa.float32(), DIM)
    assert set(files["embeddings"].column("run_id").to_pylist()) == {"r1"}
    errors = files["errors"].to_pylist()
    assert [(e["path"], e["stage"], e["error"], e["size"]) for e in errors] == [
        ("/in/6.jpg", "decode", "ValueError: bad", 106)
    ]


def test_write_files_without_errors_stages_no_errors_file(tmp_path):
    layout = OutputLayout(str(tmp_path / "out"), StorageConfig())
    out = write_files(actor_block([0, 1], failed=set()), layout=layout, run_id="r1")
    receipt = Receipt.model_validate_json(out.column("receipt")[0].as_py())
    assert [f.kind for f in receipt.files] == ["embeddings"] and receipt.errored == 0
