"""Nearest-neighbour index: build time, peak memory, recall@10 and query latency, measured in one run
(issue 11, "What it must show").

    python bench/search_bench.py                        # 200,000 x 2048, the issue's size
    python bench/search_bench.py --n 20000 --dim 256    # smoke run, seconds
    python bench/search_bench.py --scale /tmp/scale --n 200000 --nprobe 16 64   # issue 17's scale mode

Data: synthetic clustered vectors, like embeddings of a photo collection: ``--clusters`` centres drawn
N(0, I/dim), each vector a centre plus N(0, sigma^2 I/dim) noise (sigma 2, the default: a vector's cosine
to its own centre is about 0.45, to its cluster's other members about 0.2, to other clusters about 0, so
clusters overlap at the scale of the 10 nearest neighbours; with sigma 1 they are well separated and
every nprobe finds them all), cluster sizes from a Zipf-like law; L2-normalised, as bitray stores them.
Queries are fresh draws around the same centres (clusters picked uniformly), not in the index.

Measured, in this order, on the same vectors:

  exact       brute-force numpy (``X @ q``, ``argpartition``): the ground truth and the baseline latency
  flat        bitray's exact index (faiss ``IndexFlatIP`` in an ``IndexIDMap2``), as below 20,000 vectors
  ivf         bitray's approximate index, built by the same functions ``bitray index`` uses
              (``ivf_cells``, ``training_size``, ``trained_ivf``): train + add time, peak RSS while
              building, recall@10 against ``exact`` and latency at the default ``nprobe`` and a few others

Latency is one query at a time (the ``bitray search`` case), over ``--latency-queries`` queries; p50/p99.
Peak RSS is sampled every 10 ms by a thread; "extra" is the peak minus the RSS before building.
Goals (issue 11): recall@10 >= 0.95, p50 <= 20 ms on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

import numpy as np
import psutil


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200_000, help="vectors in the index")
    p.add_argument("--dim", type=int, default=2048, help="dimensions (BiT R*x1: 2048)")
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--sigma", type=float, default=2.0, help="noise around each centre (1: well separated)")
    p.add_argument("--queries", type=int, default=1000, help="queries for recall")
    p.add_argument("--latency-queries", type=int, default=300, help="single queries timed for latency")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--nprobe", type=int, nargs="*", default=[8, 55, 256], help="more nprobe to report")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    p.add_argument(
        "--scale",
        metavar="DIR",
        help="scale mode: write an embedding output of --n vectors under DIR (Parquet, 8,192 rows a file), "
        "build the compressed index on Ray, measure it (see scale_main)",
    )
    p.add_argument(
        "--generator",
        choices=("realistic", "isotropic"),
        default="realistic",
        help="scale mode's vectors: low-rank, uneven, non-negative (realistic) or the clustered isotropic "
        "ones of the default mode (isotropic)",
    )
    p.add_argument(
        "--max-index-memory",
        metavar="SIZE",
        help="scale mode's budget (default 160 bytes a vector: the issue's 100M-in-16-GB ratio)",
    )
    p.add_argument("--rerank", type=int, default=50, help="scale mode: candidates re-ranked exactly")
    return p.parse_args(argv)


def clustered(n: int, dim: int, clusters: int, sigma: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` unit vectors around ``clusters`` centres, and their centre ids, generated in chunks."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32) / np.float32(np.sqrt(dim))
    weights = 1.0 / np.arange(1, clusters + 1) ** 0.5
    labels = rng.choice(clusters, size=n, p=weights / weights.sum())
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 16384):
        part = labels[start : start + 16384]
        noise = rng.standard_normal((len(part), dim), dtype=np.float32) * np.float32(sigma / np.sqrt(dim))
        block = centres[part] + noise
        out[start : start + len(part)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out, labels


def exact_top_k(x: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Ids of the ``k`` largest inner products per query, by brute force in chunks of queries."""
    out = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), 100):
        sims = queries[start : start + 100] @ x.T
        top = np.argpartition(-sims, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1)
        out[start : start + 100] = np.take_along_axis(top, order, axis=1)
    return out


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(f[:k]) & set(t)) / k for f, t in zip(found, truth, strict=True)]))


def latencies(search, queries: np.ndarray) -> dict[str, float]:  # noqa: ANN001 - any callable on one query
    times = []
    for q in queries:
        started = time.perf_counter()
        search(q[None])
        times.append(time.perf_counter() - started)
    ms = np.array(times) * 1000
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
    }


class PeakRss:
    """Peak resident memory of this process while the block runs, sampled every 10 ms."""

    def __enter__(self) -> PeakRss:
        self.process = psutil.Process()
        self.before = self.process.memory_info().rss
        self.peak = self.before
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.done.wait(0.01):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def main(argv: list[str] | None = None) -> dict:
    import faiss

    from bitray.search.index import default_nprobe, exact_index, ivf_cells, trained_ivf, training_size

    args = parse_args(argv)
    gib = 2**30
    print(
        f"cores: {os.cpu_count()}, faiss {faiss.__version__} threads {faiss.omp_get_max_threads()}, "
        f"load average {os.getloadavg()}",
        flush=True,
    )
    x, _ = clustered(args.n, args.dim, args.clusters, args.sigma, args.seed)
    queries = _fresh_queries(args)
    print(
        f"data: {args.n} x {args.dim} float32 ({x.nbytes / gib:.2f} GiB), {args.clusters} clusters",
        flush=True,
    )
    figures: dict = {
        "n": args.n,
        "dim": args.dim,
        "clusters": args.clusters,
        "sigma": args.sigma,
        "k": args.k,
    }

    started = time.perf_counter()
    truth = exact_top_k(x, queries, args.k)
    figures["exact"] = {
        "batch_seconds": round(time.perf_counter() - started, 2),
        **latencies(
            lambda q: np.argpartition(-(x @ q[0]), args.k)[: args.k], queries[: args.latency_queries]
        ),
    }
    print(f"exact (numpy): {figures['exact']}", flush=True)

    ids = np.arange(args.n, dtype=np.int64)
    with PeakRss() as memory:
        started = time.perf_counter()
        flat = exact_index(args.dim)
        flat.add_with_ids(x, ids)
        build = time.perf_counter() - started
    found = flat.search(queries, args.k)[1]
    figures["flat"] = {
        "build_seconds": round(build, 2),
        "extra_rss_gib": round((memory.peak - memory.before) / gib, 2),
        "recall_at_k": recall(found, truth),
        **latencies(lambda q: flat.search(q, args.k), queries[: args.latency_queries]),
    }
    print(f"flat (faiss exact): {figures['flat']}", flush=True)
    flat.reset()  # frees its vectors before the IVF build is measured

    nlist = ivf_cells(args.n)
    with PeakRss() as memory:
        started = time.perf_counter()
        sample = x[
            np.sort(np.random.default_rng(args.seed).choice(args.n, training_size(args.n), replace=False))
        ]
        index = trained_ivf(sample, nlist)
        trained = time.perf_counter() - started
        del sample
        for start in range(0, args.n, 8192):
            index.add_with_ids(x[start : start + 8192], ids[start : start + 8192])
        build = time.perf_counter() - started
    serialized = faiss.serialize_index(index).nbytes
    figures["ivf"] = {
        "nlist": nlist,
        "train_vectors": training_size(args.n),
        "train_seconds": round(trained, 2),
        "build_seconds": round(build, 2),
        "peak_rss_gib": round(memory.peak / gib, 2),
        "extra_rss_gib": round((memory.peak - memory.before) / gib, 2),
        "stored_gib": round(serialized / gib, 2),
        "by_nprobe": {},
    }
    default = default_nprobe(nlist)
    for nprobe in sorted({default, *args.nprobe}):
        index.nprobe = nprobe
        found = index.search(queries, args.k)[1]
        row = {
            "recall_at_k": round(recall(found, truth), 4),
            **latencies(lambda q: index.search(q, args.k), queries[: args.latency_queries]),
        }
        figures["ivf"]["by_nprobe"][nprobe] = row
        print(f"ivf nprobe {nprobe}{' (default)' if nprobe == default else ''}: {row}", flush=True)
    figures["ivf"]["default_nprobe"] = default
    print(json.dumps(figures, indent=2))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(figures, out, indent=2)
    return figures


def _fresh_queries(args: argparse.Namespace) -> np.ndarray:
    """Query vectors from the index's clusters (same centres, same seed) with noise the index never saw."""
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.clusters, args.dim), dtype=np.float32) / np.float32(np.sqrt(args.dim))
    other = np.random.default_rng(args.seed + 10_000)
    picks = other.integers(0, args.clusters, args.queries)
    noise = other.standard_normal((args.queries, args.dim), dtype=np.float32) * np.float32(
        args.sigma / np.sqrt(args.dim)
    )
    block = centres[picks] + noise
    return block / np.linalg.norm(block, axis=1, keepdims=True)


def scale_main(args: argparse.Namespace) -> dict:
    """Scale mode: an output written like a real one, the compressed index built on Ray with the same
    functions ``bitray index`` uses, and the issue's figures: build time and peak RSS per process (driver,
    which trains; each Ray worker that encoded shards), bytes per vector (memory: code + id; disk), recall@10
    against exact brute force (computed while the vectors are generated) on ``--queries`` fresh queries,
    with and without exact re-ranking, p50/p99 latency through a warm ``SearchService`` and through a cold
    ``bitray search`` process, and a linear projection to 100M vectors."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import ray

    from bitray.search.index import IndexOptions, load_index, update_index
    from bitray.search.params import parse_memory
    from bitray.search.service import SearchService
    from bitray.search.synthetic import Realistic, write_run

    root = Path(args.scale)
    shutil.rmtree(root, ignore_errors=True)
    out, index_uri = root / "out", str(root / "index")
    rng = np.random.default_rng(args.seed)
    if args.generator == "realistic":
        generator = Realistic(args.dim, clusters=args.clusters, seed=args.seed)
        queries, _ = generator.draw(args.queries, np.random.default_rng(args.seed + 10_000))
    else:  # the default mode's vectors and queries, exactly
        everything, _ = clustered(args.n, args.dim, args.clusters, args.sigma, args.seed)
        queries = _fresh_queries(args)
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "queries.npy", queries)  # for bench/search_libs_bench.py: the same queries
    best_sims = np.full((len(queries), args.k), -np.inf, np.float32)
    best_ids = np.full((len(queries), args.k), -1, np.int64)
    paths: list[str] = []

    def batches():  # noqa: ANN202 - generated file by file; exact top-k kept as they go
        nonlocal best_sims, best_ids
        for start in range(0, args.n, 8192):
            count = min(8192, args.n - start)
            if args.generator == "realistic":
                x, _ = generator.draw(count, rng)
            else:
                x = everything[start : start + count]
            names = [f"s3://photos/{i:09d}.jpg" for i in range(start, start + count)]
            paths.extend(names)
            sims = np.concatenate([best_sims, queries @ x.T], axis=1)
            ids = np.concatenate(
                [best_ids, np.broadcast_to(np.arange(start, start + count), (len(queries), count))], axis=1
            )
            top = np.argpartition(-sims, args.k, axis=1)[:, : args.k]
            best_sims, best_ids = np.take_along_axis(sims, top, 1), np.take_along_axis(ids, top, 1)
            yield names, x

    started = time.perf_counter()
    write_run(str(out), "scale", batches())
    written = time.perf_counter() - started
    print(f"wrote {args.n} vectors in {written:.0f} s", flush=True)
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False)
    budget = parse_memory(args.max_index_memory) if args.max_index_memory else 160 * args.n
    with PeakRss() as memory:
        started = time.perf_counter()
        report = update_index(str(out), index_uri, options=IndexOptions(max_index_memory=budget))
        build = time.perf_counter() - started
    index = load_index(index_uri)
    records = [
        json.loads((root / "index" / "shards" / f"{s['name']}.json").read_text()) for s in index.meta.shards
    ]
    disk = sum(p.stat().st_size for p in (root / "index").rglob("*") if p.is_file())
    truth = [set(row) for row in best_ids]
    row_of = {p: i for i, p in enumerate(paths)}

    def recall_of(ids: np.ndarray) -> float:
        got = index.rows_of(ids.ravel()).column("path").to_pylist()
        found = np.array([row_of[p] for p in got]).reshape(ids.shape)
        return float(np.mean([len(set(f) & t) / args.k for f, t in zip(found, truth, strict=True)]))

    figures: dict = {
        "n": args.n,
        "dim": args.dim,
        "generator": args.generator,
        "budget_bytes": budget,
        "factory": index.meta.factory,
        "nprobe": index.meta.nprobe,
        "shards": len(records),
        "write_seconds": round(written, 1),
        "build_seconds": round(build, 1),
        "driver_peak_rss_gib": round(memory.peak / 2**30, 2),
        "worker_peak_rss_gib": round(max(r["peak_rss_mb"] for r in records) / 1024, 2),
        "task_seconds": round(sum(r["seconds"] for r in records), 1),
        "memory_bytes_per_vector": index.code_size + 8,
        "disk_bytes_per_vector": round(disk / args.n, 1),
        "report": report.to_dict(),
    }
    _, found = index.search(queries, args.k)
    figures["recall_at_10"] = round(recall_of(found), 4)
    for nprobe in args.nprobe:
        figures[f"recall_at_10_nprobe_{nprobe}"] = round(
            recall_of(index.search(queries, args.k, nprobe)[1]), 4
        )
    sample = queries[: min(20, len(queries))]
    started = time.perf_counter()
    _, found = index.search(sample, args.k, rerank=args.rerank)
    figures["rerank_ms_per_query"] = round((time.perf_counter() - started) * 1000 / len(sample), 1)
    figures[f"recall_at_10_rerank_{args.rerank}"] = round(
        float(
            np.mean(
                [
                    len(set(f) & t) / args.k
                    for f, t in zip(
                        np.array(
                            [row_of[p] for p in index.rows_of(found.ravel()).column("path").to_pylist()]
                        ).reshape(found.shape),
                        truth[: len(sample)],
                        strict=True,
                    )
                ]
            )
        ),
        4,
    )
    figures["in_process"] = latencies(lambda q: index.search(q, args.k), queries[: args.latency_queries])
    service = SearchService.start(index_uri, actors=max(1, min(len(records), (os.cpu_count() or 2))))
    figures["warm_service"] = latencies(lambda q: service.search(q, args.k), queries[: args.latency_queries])
    service.stop()
    times = []
    for i in range(5):
        started = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "bitray",
                "search",
                "--index",
                index_uri,
                "--path",
                paths[i * 7],
                "--json",
            ],
            check=True,
            capture_output=True,
        )
        times.append(time.perf_counter() - started)
    figures["cold_cli_seconds"] = {"p50": round(float(np.median(times)), 2), "max": round(max(times), 2)}
    scale = 100_000_000 / args.n
    figures["projection_100m"] = {
        "memory_gib": round(100_000_000 * (index.code_size + 8) / 2**30, 1),
        "shards": int(np.ceil(100_000_000 / (8192 * 16))),
        "encode_core_hours": round(figures["task_seconds"] * scale / 3600, 1),
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    ray.shutdown()
    return figures


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.scale:
        scale_main(arguments)
    else:
        main()
