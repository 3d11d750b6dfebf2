"""What an embedding run costs the driver and the object store at scale, measured in one run.

    python bench/scale_bench.py                        # 200k and 2M planned objects; a 20,000-image S3 run
    python bench/scale_bench.py --small 20000 --large 200000 --images 2000    # a quick look

1. **Driver memory.** Planning N listed objects (listing, manifest, incremental diff against a state that
   recorded 90% of them, the pending work items) in a fresh process per N, with a fake lister that yields
   S3-style objects in key order, so only bitray's own memory shows. Peak RSS (``ru_maxrss``) for
   ``--small`` and ``--large``, and their ratio (goal <= 1.3).
2. **Requests.** A real run of ``--images`` tiny JPEGs from moto's S3 server to an S3 output with the
   default settings (``rows_per_file`` 8192) and ``random:tiny``, then an incremental rerun with nothing
   new. Every request goes through a counting proxy on 127.0.0.1 and is classed as an image GET, a write
   of an output file (multipart create and part uploads), or overhead: the input listing (a LIST per
   1,000 keys), the lock (its renewals grow with the run's duration, not its size) and state and
   commits (manifest, state, run parameters, log, publishing, summary). Goal: overhead <= 1 request per
   1,000 images.
3. **Files per 1M images** at the defaults, from the rows per file the run wrote (goal <= 125).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import http.server
import io
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import bitray  # noqa: F401  (before TensorFlow: selects Keras 2)

os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", type=int, default=200_000, help="objects planned in the small case")
    p.add_argument("--large", type=int, default=2_000_000, help="objects planned in the large case")
    p.add_argument("--images", type=int, default=20_000, help="images in the counted S3 run")
    p.add_argument("--plan-only", type=int, default=None, help=argparse.SUPPRESS)  # the child process
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


# -- 1. driver memory ---------------------------------------------------------------------------------------


def plan_in_this_process(count: int) -> dict:
    """Plan ``count`` objects twice (a first run, recorded, then an incremental one); peak RSS in MB."""
    from bitray import storage
    from bitray.config import EmbedConfig
    from bitray.embed import plan as plan_module
    from bitray.embed.layout import OutputLayout
    from bitray.embed.pipeline import work_items
    from bitray.embed.state import IncrementalState, record_run
    from bitray.storage import ObjectInfo

    def fake_listing(generation: int) -> Iterator[ObjectInfo]:
        for i in range(count if generation else count * 9 // 10):  # the second listing: 10% more
            etag = f"{i:08x}{'0' * 24}"
            yield ObjectInfo(
                f"s3://bench/photos/{i:010d}.jpg", 100_000 + i % 1000, 1_700_000_000 * 10**9, etag
            )

    with tempfile.TemporaryDirectory(prefix="bitray-scale-") as tmp:
        layout = OutputLayout(tmp, storage_config := __import__("bitray.config").config.StorageConfig())
        config = EmbedConfig(inputs=["s3://bench/photos/"], output=tmp, incremental=True)
        timings = {}
        for generation in (0, 1):
            plan_module.listed_inputs = lambda *_, g=generation: fake_listing(g)  # the lister, faked
            started = time.perf_counter()
            state = IncrementalState.load(layout)
            params = plan_module.start_run(config, layout, f"run{generation}", state)
            items = work_items(params, [(0, params.rows)], 8192)
            timings[f"plan_{generation}_s"] = round(time.perf_counter() - started, 2)
            if generation == 0:
                record_run(layout, state, params)
        del storage, storage_config
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"objects": count, "incremental_todo": params.rows, "work_items": len(items),
            "peak_rss_mb": round(peak_kb / 1024, 1), **timings}  # fmt: skip


def plan_in_child(count: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--plan-only", str(count)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- 2. requests --------------------------------------------------------------------------------------------


class CountingProxy(http.server.ThreadingHTTPServer):
    """A plain HTTP proxy to one S3 endpoint that classifies and counts every request."""

    daemon_threads = True

    def __init__(self, upstream: str, classify) -> None:  # noqa: ANN001
        self.upstream = urlsplit(upstream)
        self.classify = classify
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Forward)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Forward(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # noqa: ANN002
        pass

    def _forward(self) -> None:
        server: CountingProxy = self.server  # type: ignore[assignment]
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = self._read_chunked()
        else:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
        with server.lock:
            kind = server.classify(self.command, self.path)
            server.counts[kind] += 1
            if os.environ.get("BENCH_LOG_REQUESTS") and kind.startswith("overhead"):
                print(f"request: {self.command} {self.path[:140]}", flush=True)
        upstream = http.client.HTTPConnection(server.upstream.hostname, server.upstream.port, timeout=60)
        dropped = ("connection", "expect", "transfer-encoding")
        headers = {k: v for k, v in self.headers.items() if k.lower() not in dropped}
        if body is not None:
            headers["Content-Length"] = str(len(body))
        upstream.request(self.command, self.path, body=body, headers=headers)
        reply = upstream.getresponse()
        data = reply.read()
        self.send_response(reply.status, reply.reason)
        for key, value in reply.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        # a HEAD reply has no body but says the object's length
        self.send_header(
            "Content-Length",
            reply.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data)),
        )
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        upstream.close()

    def _read_chunked(self) -> bytes:
        chunks = []
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                self.rfile.readline()
                return b"".join(chunks)
            chunks.append(self.rfile.read(size))
            self.rfile.readline()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward  # noqa: N815


def classify(method: str, path: str) -> str:
    parts = urlsplit(path)
    key, query = parts.path, parts.query
    if "/in/" in key and method == "GET" and "list-type" not in query:
        return "image_get"
    if ("/out/embeddings/" in key or "/out/errors/" in key) and (
        query.startswith("uploads") or "partNumber" in query
    ):
        return "output_write"
    if "list-type" in query and "prefix=in" in query:
        return "overhead_input_listing"
    if key.endswith("/_bitray/lock"):
        return "overhead_lock"  # acquire, release and a renewal every lock_ttl_s/4: grows with time
    return "overhead"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_behind_proxy() -> Iterator[tuple[str, CountingProxy]]:
    import boto3

    port = _free_port()
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    proxy = CountingProxy(endpoint, classify)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    os.environ.update(AWS_ENDPOINT_URL_S3=proxy.url, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1")  # fmt: skip
    try:
        client = boto3.client("s3", endpoint_url=endpoint)
        for _ in range(100):
            with contextlib.suppress(Exception):
                client.list_buckets()
                break
            time.sleep(0.1)
        yield endpoint, proxy
    finally:
        proxy.shutdown()
        moto.terminate()
        moto.wait(timeout=10)


def counted_runs(images: int) -> dict:
    import boto3
    import numpy as np
    import ray
    from PIL import Image

    from bitray.config import EmbedConfig
    from bitray.embed import run_embedding

    with moto_behind_proxy() as (endpoint, proxy):
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="bench")
        rng = np.random.default_rng(0)

        def put(i: int) -> None:
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(buffer, "JPEG")
            client.put_object(Bucket="bench", Key=f"in/{i:07d}.jpg", Body=buffer.getvalue())

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(put, range(images)))
        env = {"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
        ray.init(address="local", include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
        config = EmbedConfig(inputs=["s3://bench/in/"], output="s3://bench/out", model="random:tiny",
                             image_size=32, batch_size=256, incremental=True)  # fmt: skip
        results = {}
        try:
            for name in ("run", "rerun_nothing_new"):
                proxy.counts.clear()
                summary = run_embedding(config)
                counts = dict(proxy.counts)
                overhead = sum(v for k, v in counts.items() if k.startswith("overhead"))
                results[name] = {
                    "images": images,
                    "embedded": summary.embedded,
                    "seconds": summary.seconds,
                    "requests": counts,
                    "overhead_per_1000_images": round(1000 * overhead / images, 3),
                    "overhead_without_input_listing_per_1000": round(
                        1000 * (overhead - counts.get("overhead_input_listing", 0)) / images, 3
                    ),
                    "overhead_state_and_commits_per_1000": round(
                        1000 * counts.get("overhead", 0) / images, 3
                    ),
                }
                print(f"bench: {name}: {results[name]}", flush=True)
        finally:
            ray.shutdown()
        rows = [
            int(o["Size"] > 0) and _rows_of(client, o["Key"])
            for o in client.list_objects_v2(Bucket="bench", Prefix="out/embeddings/")["Contents"]
        ]
        results["rows_per_file"] = sorted(rows, reverse=True)
        return results


def _rows_of(client, key: str) -> int:  # noqa: ANN001
    import pyarrow.parquet as pq

    data = client.get_object(Bucket="bench", Key=key)["Body"].read()
    return pq.ParquetFile(io.BytesIO(data)).metadata.num_rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plan_only is not None:
        print(json.dumps(plan_in_this_process(args.plan_only)))
        return 0
    results: dict = {}
    results["plan_small"] = plan_in_child(args.small)
    print(f"bench: planning {args.small:,}: {results['plan_small']}", flush=True)
    results["plan_large"] = plan_in_child(args.large)
    print(f"bench: planning {args.large:,}: {results['plan_large']}", flush=True)
    results.update(counted_runs(args.images))
    full = max(results["rows_per_file"]) if results["rows_per_file"] else 0
    results["ratios"] = {
        "driver_peak_rss_large_over_small": round(
            results["plan_large"]["peak_rss_mb"] / results["plan_small"]["peak_rss_mb"], 3
        ),
        "overhead_requests_per_1000_images_run": results["run"]["overhead_per_1000_images"],
        "overhead_requests_per_1000_images_rerun": results["rerun_nothing_new"]["overhead_per_1000_images"],
        "files_per_1M_images": -(-1_000_000 // full) if full else None,
    }
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
