"""The library choice, measured (issue 17): autofaiss and Lance beside bitray on the scale bench's vectors.

    python bench/search_bench.py --scale DIR --n 200000 --json DIR/bitray.json   # bitray's figures, keeps DIR
    /work/libenv/bin/python bench/search_libs_bench.py DIR --bitray DIR/bitray.json

Run it with a Python that has ``autofaiss`` and ``pylance`` (not bitray dependencies: e.g. a venv of its
own). It reads the output the scale bench wrote under ``DIR/out`` (the same vectors) and its queries
(``DIR/queries.npy``: the same 1,000), takes the exact top-10 by brute force, then per library: build
time, index bytes per vector, recall@10 and single-query p50/p99 over 300 queries, at the same budget of
160 bytes a vector:

  autofaiss  ``build_index(max_index_memory_usage=160 B x n)``: the parameters it picks, built in one process
  lance      ``create_index("IVF_PQ", num_sub_vectors=128)`` (128-byte codes, cosine) on a Lance dataset of
             the vectors, searched with ``nprobes``; and ``take`` of 50 rows (random access, for re-ranking)
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def load(root: str) -> tuple[np.ndarray, list[str]]:
    files = sorted(glob.glob(os.path.join(root, "out", "embeddings", "*.parquet")))
    parts, paths = [], []
    for f in files:
        t = pq.read_table(f, columns=["path", "embedding"])
        paths.extend(t.column("path").to_pylist())
        col = t.column("embedding").combine_chunks()
        parts.append(col.values.to_numpy().reshape(len(col), -1))
    return np.ascontiguousarray(np.concatenate(parts), np.float32), paths


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / truth.shape[1] for f, t in zip(found, truth, strict=True)]))


def timed(search, queries: np.ndarray) -> dict:  # noqa: ANN001 - a callable on one query
    times = []
    for q in queries:
        started = time.perf_counter()
        search(q[None])
        times.append((time.perf_counter() - started) * 1000)
    return {"p50_ms": round(float(np.median(times)), 1), "p99_ms": round(float(np.percentile(times, 99)), 1)}


def run_autofaiss(x: np.ndarray, queries: np.ndarray, truth: np.ndarray, args: argparse.Namespace) -> dict:
    import faiss
    from autofaiss import build_index

    started = time.perf_counter()
    index, infos = build_index(
        embeddings=x,
        save_on_disk=False,
        max_index_memory_usage=f"{160 * len(x) // 2**20}MB",
        current_memory_available=args.memory,
        metric_type="ip",
        min_nearest_neighbors_to_retrieve=args.k,
        verbose=30,
    )
    build = time.perf_counter() - started
    size = len(faiss.serialize_index(index))
    _, found = index.search(queries, args.k)
    return {
        "library": "autofaiss",
        "index": infos.get("index_key", ""),
        "params": infos.get("index_param", ""),
        "build_s": round(build, 1),
        "bytes_per_vector": round(size / len(x), 1),
        "recall_at_10": round(recall(found, truth), 4),
        **timed(lambda q: index.search(q, args.k), queries[: args.latency_queries]),
    }


def run_lance(x: np.ndarray, queries: np.ndarray, truth: np.ndarray, args: argparse.Namespace) -> dict:
    import lance

    where = os.path.join(args.dir, "lance")
    shutil.rmtree(where, ignore_errors=True)
    table = pa.table(
        {
            "id": pa.array(np.arange(len(x)), pa.int64()),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1]),
        }
    )
    started = time.perf_counter()
    ds = lance.write_dataset(table, where)
    written = time.perf_counter() - started
    del table
    partitions = int(2 * np.sqrt(len(x)))
    started = time.perf_counter()
    ds.create_index(
        "vector", index_type="IVF_PQ", num_partitions=partitions, num_sub_vectors=128, metric="cosine"
    )
    build = time.perf_counter() - started
    size = sum(
        os.path.getsize(os.path.join(d, f))
        for d, _, fs in os.walk(os.path.join(where, "_indices"))
        for f in fs
    )
    out = {
        "library": "lance",
        "index": f"IVF{partitions}_PQ128 (cosine)",
        "write_s": round(written, 1),
        "build_s": round(build, 1),
        "bytes_per_vector": round(size / len(x), 1),
    }

    def search(q: np.ndarray, nprobes: int) -> np.ndarray:
        t = ds.to_table(
            nearest={"column": "vector", "q": q[0], "k": args.k, "nprobes": nprobes}, columns=["id"]
        )
        return np.array(t.column("id").to_pylist() + [-1] * (args.k - t.num_rows))

    for nprobes in args.nprobes:
        found = np.stack([search(q[None], nprobes) for q in queries])
        out[f"recall_at_10_nprobes_{nprobes}"] = round(recall(found, truth), 4)
    out.update(timed(lambda q: search(q, args.nprobes[0]), queries[: args.latency_queries]))
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for _ in range(20):
        ds.take(np.sort(rng.choice(len(x), 50, replace=False)), columns=["vector"])
    out["take_50_rows_ms"] = round((time.perf_counter() - started) * 1000 / 20, 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dir", help="the scale bench's directory (its out/ holds the vectors)")
    p.add_argument("--bitray", metavar="JSON", help="the scale bench's --json figures, printed beside")
    p.add_argument("--libraries", nargs="*", default=["autofaiss", "lance"])
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--latency-queries", type=int, default=300)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--nprobes", type=int, nargs="*", default=[64, 128])
    p.add_argument("--memory", default="6G", help="autofaiss's current_memory_available")
    args = p.parse_args()
    x, _ = load(args.dir)
    queries = np.load(os.path.join(args.dir, "queries.npy"))[: args.queries]
    truth = np.argpartition(-(queries @ x.T), args.k, axis=1)[:, : args.k]
    rows = []
    if args.bitray:
        with open(args.bitray) as f:
            b = json.load(f)
        rows.append(
            {
                "library": "bitray (faiss, sharded on Ray)",
                "index": f"{b['factory']}, nprobe {b['nprobe']}",
                "build_s": b["build_seconds"],
                "bytes_per_vector": b["memory_bytes_per_vector"],
                "recall_at_10": b["recall_at_10"],
                "p50_ms": b["warm_service"]["p50_ms"],
                "p99_ms": b["warm_service"]["p99_ms"],
            }
        )
    for name in args.libraries:
        try:
            rows.append({"autofaiss": run_autofaiss, "lance": run_lance}[name](x, queries, truth, args))
        except Exception as e:  # noqa: BLE001 - a library failing is a finding, printed in the table
            rows.append({"library": name, "error": f"{type(e).__name__}: {e}"[:300]})
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
