"""The online API under load (issue 18, "Benchmarks"), measured in one run on this machine.

    python bench/serve_bench.py                              # r50x1 at 224, 30 s per level, 3 min load test
    python bench/serve_bench.py --model random:tiny --size 32 --seconds 5 --load-seconds 30   # smoke run

1. ``/embed`` throughput and latency at concurrency 1, 8 and 32 (``--concurrency``), HTTP on 127.0.0.1
   through Ray Serve (ingress decodes, one model replica batches), against a plain single-process loop
   in this process: decode (``prepare_for_model``, the pipeline's decode) + a ``tf.function`` forward pass,
   one image at a time. Both see the same 640x480 JPEGs. Goals: >= 0.8x the loop at 1, >= 1.5x at 32.
2. ``/search`` latency end to end (p50, p99), by path (JSON) and by image, on an IVF index of
   ``--index-size`` synthetic vectors shaped like embeddings (``bitray.search.synthetic``) served by a
   second application. Goal: p50 <= 100 ms.
3. A bounded load test: ``--load-seconds`` at concurrency 8 on ``/embed`` with 1% bad images (not an image,
   truncated): every bad one must get a 4xx, nothing a 5xx, and the replicas' memory (RSS of the ingress
   and model replicas, sampled every 2 s) in the last minute within 1.1x of the first.

The client runs on the same 2 cores as the server (threads, ``requests``): the figures include its cost.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

import bitray  # noqa: F401  (selects Keras 2 before TensorFlow loads)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="random:r50x1")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seconds", type=float, default=30.0, help="per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--index-size", type=int, default=200_000)
    parser.add_argument("--search-queries", type=int, default=200)
    parser.add_argument("--load-seconds", type=float, default=180.0)
    parser.add_argument("--json", metavar="FILE", help="also write the figures here")
    return parser.parse_args(argv)


def photos(count: int, seed: int = 0) -> list[bytes]:
    """Smooth, photo-like 640x480 JPEGs (quality 90), distinct."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:480, 0:640].astype(np.float32)
    out = []
    for i in range(count):
        phase = rng.uniform(0, 6, 3)
        waves = [np.sin(x / (19 + 3 * i) + phase[c]) * np.cos(y / (13 + 2 * c) - phase[c]) for c in range(3)]
        pixels = np.stack(waves, -1) * 90 + 128 + rng.normal(0, 10, (480, 640, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def summary(latencies: list[float], elapsed: float) -> dict:
    ms = sorted(1000 * t for t in latencies)
    return {
        "requests": len(ms),
        "req_per_s": round(len(ms) / elapsed, 2),
        "p50_ms": round(statistics.median(ms), 1),
        "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 1),
    }


def plain_loop(spec: str, size: int, images: list[bytes], seconds: float) -> dict:
    """One request at a time in one process: decode, then a traced forward pass (uint8 in, as served)."""
    import tensorflow as tf

    from bitray.images import prepare_for_model
    from bitray.model import load_model

    model = load_model(spec).model
    forward = tf.function(
        lambda images: model(tf.cast(images, tf.float32) * (1 / 255), training=False),
        input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)],
    )

    def one(data: bytes) -> None:
        pixels, _, _ = prepare_for_model(data, (size, size))
        forward(pixels[None]).numpy()

    for data in images[:3]:
        one(data)
    latencies, start, i = [], time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        began = time.perf_counter()
        one(images[i % len(images)])
        latencies.append(time.perf_counter() - began)
        i += 1
    return summary(latencies, time.perf_counter() - start)


def http_load(url: str, bodies, concurrency: int, seconds: float, on_reply=None) -> dict:  # noqa: ANN001
    """``concurrency`` clients posting ``bodies(i) -> (data, headers, tag)`` for ``seconds``."""
    import requests

    latencies: list[float] = []
    statuses: Counter = Counter()
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(worker: int) -> None:
        session, i = requests.Session(), worker
        while time.perf_counter() < deadline:
            data, headers, tag = bodies(i)
            began = time.perf_counter()
            reply = session.post(url, data=data, headers=headers, timeout=120)
            took = time.perf_counter() - began
            with lock:
                statuses[reply.status_code] += 1
                if reply.status_code == 200:
                    latencies.append(took)
                if on_reply is not None:
                    on_reply(tag, reply)
            i += concurrency

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, range(concurrency)))
    result = summary(latencies, time.perf_counter() - start) if latencies else {"requests": 0}
    return {**result, "statuses": dict(statuses)}


def start_app(config, name: str) -> str:  # noqa: ANN001 - a ServeConfig
    from ray import serve

    from bitray.serve.app import build

    serve.run(build(config), name=name, route_prefix=f"/{name}" if name != "bitray" else "/")
    return f"http://127.0.0.1:{config.port}" + (f"/{name}" if name != "bitray" else "")


def replica_pids() -> list[int]:
    """This run's Serve replicas: processes below this one (the local Ray it started) named so by Ray."""
    import psutil

    found = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if child.cmdline() and child.cmdline()[0].startswith("ray::ServeReplica:bitray:"):
                found.append(child.pid)
    return found


def rss_mb(pids: list[int]) -> float:
    import psutil

    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            total += psutil.Process(pid).memory_info().rss
    return total / 2**20


def load_test(url: str, images: list[bytes], seconds: float) -> dict:
    bad = [b"<!DOCTYPE html><html>not an image</html>", images[0][: len(images[0]) // 3]]
    rng = np.random.default_rng(7)
    plan = rng.random(1_000_000) < 0.01
    wrong: list[str] = []
    sent_bad = Counter()

    def bodies(i: int):  # noqa: ANN202
        if plan[i % len(plan)]:
            return bad[i % 2], {"Content-Type": "image/jpeg"}, "bad"
        return images[i % len(images)], {"Content-Type": "image/jpeg"}, "good"

    def on_reply(tag: str, reply) -> None:  # noqa: ANN001
        sent_bad[tag] += 1
        if tag == "bad" and not (400 <= reply.status_code < 500 and "error" in reply.json()):
            wrong.append(f"bad image -> {reply.status_code}")
        if tag == "good" and reply.status_code != 200:
            wrong.append(f"good image -> {reply.status_code}")

    pids = replica_pids()
    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample() -> None:
        start = time.perf_counter()
        while not stop.is_set():
            samples.append((time.perf_counter() - start, rss_mb(pids)))
            stop.wait(2.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    result = http_load(url, bodies, 8, seconds, on_reply)
    stop.set()
    sampler.join()
    window = min(60.0, seconds / 3)
    first = [m for t, m in samples if t <= window]
    last = [m for t, m in samples if t >= samples[-1][0] - window]
    five_xx = sum(n for status, n in result["statuses"].items() if status >= 500)
    return {
        **result,
        "bad_sent": sent_bad["bad"],
        "wrong": wrong[:5],
        "wrong_count": len(wrong),
        "5xx": five_xx,
        "replicas": len(pids),
        "rss_first_window_mb": round(statistics.mean(first), 1),
        "rss_last_window_mb": round(statistics.mean(last), 1),
        "rss_ratio": round(statistics.mean(last) / statistics.mean(first), 3),
        "window_s": window,
    }


def search_index(root: Path, count: int) -> str:
    from bitray.model import load_model
    from bitray.search.index import update_index
    from bitray.search.synthetic import MODEL, Realistic, batches_of, write_run

    dim = load_model(MODEL).feature_dim
    vectors, _ = Realistic(dim).draw(count, np.random.default_rng(0))
    paths = [f"{root}/photos/img-{i:07d}.jpg" for i in range(count)]
    write_run(str(root / "out"), "bench", batches_of(paths, vectors, 8192))
    update_index(str(root / "out"))
    return str(root / "out" / "_index")


def search_latency(url: str, index_paths: list[str], images: list[bytes], queries: int) -> dict:
    import requests

    session = requests.Session()
    by_path, by_image = [], []
    for i in range(queries + 5):
        began = time.perf_counter()
        reply = session.post(f"{url}/search", json={"path": index_paths[i % len(index_paths)], "k": 10})
        assert reply.status_code == 200, reply.text
        if i >= 5:
            by_path.append(time.perf_counter() - began)
        began = time.perf_counter()
        reply = session.post(f"{url}/search?k=10", data=images[i % len(images)])
        assert reply.status_code == 200, reply.text
        if i >= 5:
            by_image.append(time.perf_counter() - began)
    return {"by_path": summary(by_path, sum(by_path)), "by_image": summary(by_image, sum(by_image))}


def main(argv: list[str] | None = None) -> int:
    import os
    import socket

    import ray
    from ray import serve

    from bitray.serve.config import ServeConfig

    args = parse_args(argv)
    images = photos(32)
    figures: dict = {"model": args.model, "size": args.size, "cpus": os.cpu_count()}
    figures["plain_loop"] = plain_loop(args.model, args.size, images, args.seconds)
    print(json.dumps({"plain_loop": figures["plain_loop"]}), flush=True)

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        config = ServeConfig(model=args.model, image_size=args.size, port=port, replicas_max=1,
                             batch_size=args.batch_size)  # fmt: skip
        url = start_app(config, "bitray")
        for data in images[:4]:
            __import__("requests").post(f"{url}/embed", data=data, timeout=120)
        figures["embed"] = {}
        embedder = serve.get_deployment_handle("embedder", app_name="bitray")
        for concurrency in args.concurrency:
            before = embedder.stats.remote().result()

            def bodies(i: int):  # noqa: ANN202
                return images[i % len(images)], {"Content-Type": "image/jpeg"}, "good"

            result = http_load(f"{url}/embed", bodies, concurrency, args.seconds)
            result["vs_plain_loop"] = round(result["req_per_s"] / figures["plain_loop"]["req_per_s"], 2)
            after = embedder.stats.remote().result()
            batches, served = after["batches"] - before["batches"], after["images"] - before["images"]
            result["mean_batch"] = round(served / max(1, batches), 2)
            result["model_busy"] = round((after["forward_s"] - before["forward_s"]) / args.seconds, 2)
            figures["embed"][concurrency] = result
            print(json.dumps({f"embed@{concurrency}": result}), flush=True)
        figures["load_test"] = load_test(f"{url}/embed", images, args.load_seconds)
        print(json.dumps({"load_test": figures["load_test"]}), flush=True)
        serve.delete("bitray")

        with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
            began = time.perf_counter()
            index = search_index(Path(tmp), args.index_size)
            built = time.perf_counter() - began
            search_url = start_app(ServeConfig(index=index, port=port, replicas_max=1), "bitray")
            paths = [f"{tmp}/photos/img-{i:07d}.jpg" for i in range(0, args.index_size, 997)]
            figures["search"] = {
                "index_size": args.index_size,
                "index_build_s": round(built, 1),
                **search_latency(search_url, paths, images, args.search_queries),
            }
            print(json.dumps({"search": figures["search"]}), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
