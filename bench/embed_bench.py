"""Embedding throughput and memory, measured in one run on the same images (issue 3, "What it must show").

    python bench/embed_bench.py                      # R101x1 at 224 px, N=300 (and 10N for memory)
    python bench/embed_bench.py --arch tiny --n 48 --size 64 --scale 2   # smoke run, a minute on a laptop
    python bench/embed_bench.py --mixed-precision    # on a GPU machine

N synthetic JPEGs (500x375, from scikit-image's sample photos: random crops, flips and colour shifts) are
uploaded to an S3 endpoint (moto's server, in its own process on 127.0.0.1 so its memory is not counted).
Then, with random-init weights of ``--arch`` (the same weights in every phase):

  (b) the full pipeline, ``bitray.embed.run_embedding``: S3 -> decode -> actors -> Parquet (a local dir),
      with ``--rows-per-file`` rows per output file (default: a tenth of N, so that steady state shows);
      on N images, then on scale*N images for memory. RSS of the driver and of every process it started
      (raylet, workers, actors; moto excluded) is sampled every 0.2 s; peaks are reported.
  (a) model only: the same N images decoded in advance, fed to the model in batches (driver, all cores).
  (c) a naive loop: boto3 get_object, PIL decode + bilinear resize, batch, ``hub.KerasLayer`` on a
      SavedModel exported from the same model (float32, as such a loop would run it).

(b) runs first, while the driver has not imported TensorFlow, so Ray's workers have the cores to
themselves, each run on a fresh local Ray instance; (a) and (c) run after Ray has shut down. Throughput
of (b) is reported twice: end to end (``run_embedding``'s wall time, including actor start and model
load) and steady state (images published after the first file, over the time between the first and last
published files). Ratios use both.
Goals (issue 3): b/a >= 0.9, b/c >= 1.0, peak RSS at scale*N within 1.25x of N. Sums of RSS count pages
shared between processes (the object store) more than once; they are an upper bound.

    python bench/embed_bench.py --mode cpu-stage --n 400     # the CPU stage against plain Pillow (issue 9)

``--mode cpu-stage``: N local JPEGs made from real sample photos (``photos.varied_jpegs``; half 500x375,
half 2000x1500), then in one run (d) the pipeline's steady-state images/s from local files with
``random:tiny`` at ``--size``, and (e) a plain Pillow loop over the same files, one process per CPU
(``Image.draft`` to the size, then the bilinear resize). Goal: d/e >= 0.8. For what bounds (d): (f) the
pipeline's decode stage alone in one process (per core against (e)), and (g) the model alone on all cores
(at 224 px ``random:tiny`` is not free on a small CPU: the pipeline cannot outrun it).

    python bench/embed_bench.py --mode actor --n 96          # R50x1: the actor's time outside the model

``--mode actor``: ``EmbedActor`` (R50x1 by default) driven in this process on blocks made by the decode
stage (``decode_items``), turned into numpy batches by Ray Data's own block conversion. Reports the
share of the actor's call time spent outside its forward pass, and of that conversion. Goal: < 10%.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

import bitray  # noqa: F401  (before TensorFlow: selects Keras 2)

os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

BUCKET = "bench"
SIZE_WH = (500, 375)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("compare", "cpu-stage", "actor"), default="compare")
    p.add_argument(
        "--arch",
        default=None,
        help="BiT variant (random-init weights); default r101x1 (compare), tiny (cpu-stage), r50x1 (actor)",
    )
    p.add_argument("--n", type=int, default=300, help="images for the throughput comparison")
    p.add_argument("--scale", type=int, default=10, help="memory: compare peak RSS at N and scale*N images")
    p.add_argument("--size", type=int, default=224, help="model input size (square)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rows-per-file", type=int, default=None, help="pipeline setting (default: N/10)")
    p.add_argument("--mixed-precision", action="store_true", help="float16 compute for (a) and (b) on GPU")
    p.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs given to the local Ray instance")
    p.add_argument("--actors-max", type=int, default=None, help="pipeline setting (default: bitray decides)")
    p.add_argument("--cpus-per-actor", type=float, default=None, help="pipeline setting (default: bitray)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.arch is None:
        args.arch = {"compare": "r101x1", "cpu-stage": "tiny", "actor": "r50x1"}[args.mode]
    return args


# -- images and the S3 endpoint -----------------------------------------------------------------------------


def synthetic_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """``n`` distinct 500x375 JPEGs (quality 90) cut from scikit-image's sample photos."""
    from PIL import Image, ImageOps
    from skimage import data

    bases = [
        Image.fromarray(getattr(data, name)()).convert("RGB")
        for name in ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")
    ]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        base = bases[i % len(bases)]
        w, h = base.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        image = base.crop((x, y, x + cw, y + ch)).resize(SIZE_WH, Image.Resampling.BILINEAR)
        if rng.random() < 0.5:
            image = ImageOps.mirror(image)
        shift = rng.integers(-20, 21, size=3)
        pixels = np.clip(np.asarray(image, np.int16) + shift, 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_server() -> Iterator[tuple[str, subprocess.Popen]]:
    """moto's S3 server in a child process on 127.0.0.1; yields (endpoint URL, process)."""
    import boto3

    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL_S3=endpoint,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    try:
        client = boto3.client("s3", endpoint_url=endpoint)
        for _ in range(100):
            try:
                client.list_buckets()
                break
            except Exception:  # not listening yet
                time.sleep(0.1)
        else:
            raise RuntimeError("moto server did not start")
        yield endpoint, proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def upload(client, prefix: str, images: list[bytes], copies: int = 1) -> None:  # noqa: ANN001
    from concurrent.futures import ThreadPoolExecutor

    jobs = [(f"{prefix}{c:02d}-{i:05d}.jpg", data) for c in range(copies) for i, data in enumerate(images)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda kv: client.put_object(Bucket=BUCKET, Key=kv[0], Body=kv[1]), jobs))


@contextlib.contextmanager
def local_ray(cpus: int) -> Iterator[None]:
    import ray

    ray.init(
        address="local",  # a new instance, never a cluster that happens to run on this machine
        num_cpus=cpus,
        include_dashboard=False,
        log_to_driver=True,
        runtime_env={"env_vars": {"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}},
    )
    try:
        yield
    finally:
        ray.shutdown()


# -- memory -------------------------------------------------------------------------------------------------


class RssSampler:
    """Peak RSS of this process and of every process it started (except ``exclude``), sampled in a thread."""

    def __init__(self, exclude: set[int], interval_s: float = 0.2) -> None:
        import psutil

        self.me = psutil.Process()
        self.exclude = exclude
        self.interval_s = interval_s
        self.peak = {"driver_mb": 0.0, "others_mb": 0.0, "total_mb": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import psutil

        driver = self.me.memory_info().rss
        others = 0
        for child in self.me.children(recursive=True):
            if child.pid in self.exclude:
                continue
            with contextlib.suppress(psutil.Error):
                others += child.memory_info().rss
        for key, value in (("driver_mb", driver), ("others_mb", others), ("total_mb", driver + others)):
            self.peak[key] = max(self.peak[key], value / 2**20)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


# -- the three measurements ---------------------------------------------------------------------------------


def pipeline(args: argparse.Namespace, source: str, output: Path, exclude_pid: int | None) -> dict:
    """(b), (d): ``run_embedding`` to local Parquet, with peak RSS and steady-state throughput."""
    from bitray.config import EmbedConfig
    from bitray.embed import run_embedding

    config = EmbedConfig(
        inputs=[source],
        output=str(output),
        model=f"random:{args.arch}",
        image_size=args.size,
        batch_size=args.batch_size,
        rows_per_file=args.rows_per_file or max(args.batch_size, args.n // 10),
        mixed_precision=args.mixed_precision,
        actors_max=args.actors_max,
        cpus_per_actor=args.cpus_per_actor,
    )
    with RssSampler(exclude={exclude_pid} - {None}) as rss:
        summary = run_embedding(config)
    steady = steady_rate([*output.glob("embeddings/*.parquet"), *output.glob("errors/*.parquet")])
    return {
        "images": summary.inputs,
        "embedded": summary.embedded,
        "errored": summary.errored,
        "model_id": summary.model_id,
        "seconds": summary.seconds,
        "images_per_s_end_to_end": summary.images_per_s,
        "images_per_s_steady": steady,
        "peak_rss_mb": rss.peak,
    }


def steady_rate(files: list[Path]) -> float | None:
    """Images per second between the first and the last published file (actor start and model load
    excluded): rows of every file but the first, over the time between the first and the last."""
    import pyarrow.parquet as pq

    if len(files) < 2:
        return None
    published = sorted((p.stat().st_mtime, pq.ParquetFile(p).metadata.num_rows) for p in files)
    span = published[-1][0] - published[0][0]
    later = sum(rows for _, rows in published[1:])
    return later / span if span > 0 else None


def model_only(args: argparse.Namespace, images: list[bytes]) -> dict:
    """(a): the model on pre-decoded arrays (same decode and resize as the pipeline)."""
    import tf_keras

    from bitray.images import prepare_for_model
    from bitray.model import load_model

    if args.mixed_precision:
        tf_keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        loaded = load_model(f"random:{args.arch}")
        size = (args.size, args.size)  # the pipeline's decode, scaled to [0, 1] as its actors do
        arrays = np.stack([prepare_for_model(data, size)[0] for data in images]).astype(np.float32) / 255
        batches = [arrays[i : i + args.batch_size] for i in range(0, len(arrays), args.batch_size)]
        forward = loaded.inference_function()  # the same traced graph the pipeline's actors run
        forward(batches[0])  # trace and warm up
        start = time.perf_counter()
        for batch in batches:
            np.asarray(forward(batch))
        seconds = time.perf_counter() - start
    finally:
        tf_keras.mixed_precision.set_global_policy("float32")
    return {"images": len(arrays), "seconds": round(seconds, 3), "images_per_s": len(arrays) / seconds}


def naive_loop(args: argparse.Namespace, endpoint: str, prefix: str, workdir: Path) -> dict:
    """(c): boto3 + PIL + hub.KerasLayer, one image at a time into batches, no Ray."""
    import boto3
    import tensorflow_hub as hub
    from PIL import Image

    from bitray.model import load_model
    from bitray.model.export import export_savedmodel

    saved = export_savedmodel(load_model(f"random:{args.arch}"), workdir / "savedmodel")
    layer = hub.KerasLayer(str(saved))
    layer(np.zeros((1, args.size, args.size, 3), np.float32))  # load and warm up
    client = boto3.client("s3", endpoint_url=endpoint)
    start = time.perf_counter()
    keys = [
        obj["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        for obj in page.get("Contents", [])
    ]
    batch, count = [], 0
    for i, key in enumerate(keys):
        data = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        image = (
            Image.open(io.BytesIO(data))
            .convert("RGB")
            .resize((args.size, args.size), Image.Resampling.BILINEAR)
        )
        batch.append(np.asarray(image, np.float32) / 255.0)
        if len(batch) == args.batch_size or i == len(keys) - 1:
            count += len(np.asarray(layer(np.stack(batch))))
            batch = []
    seconds = time.perf_counter() - start
    return {"images": count, "seconds": round(seconds, 3), "images_per_s": count / seconds}


def pillow_loop(paths: list[Path], size: int, processes: int) -> dict:
    """(e): plain Pillow over local files, one process per CPU: open, draft to the size, resize."""
    import functools
    import multiprocessing

    one = functools.partial(_pillow_one, size=size)
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        pool.map(one, paths[: 4 * processes], chunksize=1)  # start the workers, load the codecs
        start = time.perf_counter()
        done = sum(pool.map(one, paths, chunksize=4))
        seconds = time.perf_counter() - start
    return {"images": done, "seconds": round(seconds, 3), "images_per_s": done / seconds}


def _pillow_one(path: Path, size: int) -> int:
    from PIL import Image

    with Image.open(path) as image:
        image.draft("RGB", (size, size))
        np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
    return 1


def cpu_stage(args: argparse.Namespace) -> dict:
    """(d) and (e) on the same local JPEGs, in one run."""
    from photos import varied_jpegs

    images = varied_jpegs(args.n, [(500, 375), (2000, 1500)])
    kib = sum(map(len, images)) / len(images) / 1024
    print(f"bench: {len(images)} JPEGs (half 500x375, half 2000x1500), {kib:.0f} KiB on average", flush=True)
    results: dict = {"settings": vars(args) | {"json": str(args.json) if args.json else None}}
    with tempfile.TemporaryDirectory(prefix="bitray-bench-") as tmp:
        photos = Path(tmp) / "photos"
        photos.mkdir()
        paths = [photos / f"{i:05d}.jpg" for i in range(len(images))]
        for path, data in zip(paths, images, strict=True):
            path.write_bytes(data)
        with local_ray(args.cpus):
            results["d_pipeline"] = pipeline(args, str(photos), Path(tmp) / "out", None)
        print(f"bench: (d) pipeline {results['d_pipeline']}", flush=True)
        results["e_pillow"] = pillow_loop(paths, args.size, args.cpus)
        print(f"bench: (e) Pillow, {args.cpus} processes {results['e_pillow']}", flush=True)
        results["f_decode_one_core"] = decode_one_core(paths, args)
        print(f"bench: (f) bitray's decode stage, one process {results['f_decode_one_core']}", flush=True)
        results["g_model_only"] = model_only(args, images)
        print(f"bench: (g) model only {results['g_model_only']}", flush=True)
    d, e, f, g = (results[k] for k in ("d_pipeline", "e_pillow", "f_decode_one_core", "g_model_only"))
    results["ratios"] = {
        "d_over_e_steady": _ratio(d["images_per_s_steady"], e["images_per_s"]),
        "d_over_e_end_to_end": _ratio(d["images_per_s_end_to_end"], e["images_per_s"]),
        "f_over_e_per_core": _ratio(f["images_per_s"] * args.cpus, e["images_per_s"]),
        "g_over_e": _ratio(g["images_per_s"], e["images_per_s"]),
    }
    return results


def decode_one_core(paths: list[Path], args: argparse.Namespace) -> dict:
    """(f): the pipeline's decode stage (``decode_items``: read, fast decode, one block per model batch)
    in this process alone, to compare per core with (e)."""
    from bitray.embed.manifest import manifest_table
    from bitray.storage import ObjectInfo

    rows = manifest_table([ObjectInfo(str(p), p.stat().st_size, p.stat().st_mtime_ns, None) for p in paths])
    with tempfile.TemporaryDirectory(prefix="bitray-bench-") as manifest_dir:
        start = time.perf_counter()
        for _ in decode_stage(rows, manifest_dir, args):
            pass
        seconds = time.perf_counter() - start
    return {"images": len(paths), "seconds": round(seconds, 3), "images_per_s": len(paths) / seconds}


def decode_stage(rows, manifest_dir: str, args: argparse.Namespace):  # noqa: ANN001, ANN201
    """The blocks the pipeline's decode stage (``decode_items``) makes of the manifest ``rows``: one
    manifest part, work items of up to 8,192 rows like the pipeline's, one block per model batch."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bitray.config import StorageConfig
    from bitray.embed.decode import decode_items
    from bitray.embed.manifest import PART_ROWS
    from bitray.embed.ranges import RowRanges
    from bitray.embed.sandbox import DecodeOptions

    pq.write_table(rows, Path(manifest_dir) / "part-00000.parquet")
    starts = list(range(0, rows.num_rows, PART_ROWS))
    items = pa.table({"part": ["part-00000.parquet"] * len(starts), "start": starts,
                      "stop": [min(s + PART_ROWS, rows.num_rows) for s in starts]})  # fmt: skip
    return decode_items(
        items,
        manifest_dir=manifest_dir,
        storage_config=StorageConfig(),
        options=DecodeOptions((args.size, args.size)),
        batch_size=args.batch_size,
        max_bytes=None,
        committed=RowRanges().as_arrays(),
    )


def actor_share(args: argparse.Namespace) -> dict:
    """The actor's call time outside its forward pass, on blocks the decode stage made."""
    from photos import varied_jpegs
    from ray.data.block import BlockAccessor

    from bitray.config import StorageConfig
    from bitray.embed.actor import EmbedActor
    from bitray.embed.manifest import manifest_table
    from bitray.storage import list_objects

    images = varied_jpegs(args.n, [(500, 375), (2000, 1500)])
    with tempfile.TemporaryDirectory(prefix="bitray-bench-") as tmp:
        for i, data in enumerate(images):
            (Path(tmp) / f"{i:05d}.jpg").write_bytes(data)
        rows = manifest_table(list(list_objects(tmp)))
        blocks = list(decode_stage(rows, tmp, args))
    actor = EmbedActor(model_spec=f"random:{args.arch}", storage=StorageConfig(), threads=args.cpus)
    to_numpy = lambda block: BlockAccessor.for_block(block).to_batch_format("numpy")  # noqa: E731
    actor(to_numpy(blocks[0]))  # trace and warm up
    actor.timing.reset()
    convert_s = 0.0
    for block in blocks:
        start = time.perf_counter()
        batch = to_numpy(block)
        convert_s += time.perf_counter() - start
        actor(batch)
    timing = actor.timing
    return {
        "model": f"random:{args.arch}",
        "images": timing.rows,
        "batches": timing.calls,
        "call_s": round(timing.call_s, 3),
        "forward_s": round(timing.forward_s, 3),
        "outside_forward_share": round(timing.outside_share, 4),
        "block_to_numpy_s": round(convert_s, 4),
        "outside_forward_share_with_conversion": round(1 - timing.forward_s / (timing.call_s + convert_s), 4),
    }


def _ratio(x: float | None, y: float | None) -> float | None:
    return round(x / y, 3) if x and y else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.mode != "compare":
        print(f"bench: mode={args.mode} arch={args.arch} n={args.n} size={args.size} "
              f"batch={args.batch_size} cpus={args.cpus}", flush=True)  # fmt: skip
        results = cpu_stage(args) if args.mode == "cpu-stage" else {"actor": actor_share(args)}
        print(json.dumps(results, indent=2, default=str))
        if args.json:
            args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
        return 0
    import boto3

    print(
        f"bench: arch={args.arch} n={args.n} scale={args.scale} size={args.size} "
        f"batch={args.batch_size} mixed_precision={args.mixed_precision} cpus={args.cpus}",
        flush=True,
    )
    images = synthetic_jpegs(args.n)
    print(
        f"bench: {len(images)} JPEGs, {sum(map(len, images)) / len(images) / 1024:.0f} KiB on average",
        flush=True,
    )
    results: dict = {"settings": vars(args) | {"json": str(args.json) if args.json else None}}
    with moto_server() as (endpoint, moto), tempfile.TemporaryDirectory(prefix="bitray-bench-") as tmp:
        workdir = Path(tmp)
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket=BUCKET)
        upload(client, "n/", images)
        upload(client, "scaled/", images, copies=args.scale)
        for key, prefix in (("b_pipeline", "n/"), ("b_pipeline_scaled", "scaled/")):
            with local_ray(args.cpus):  # a fresh instance per run: idle workers of a run skew the next's RSS
                results[key] = pipeline(args, f"s3://{BUCKET}/{prefix}", workdir / f"out-{key}", moto.pid)
            print(f"bench: (b) {prefix} {results[key]}", flush=True)
        results["a_model_only"] = model_only(args, images)
        print(f"bench: (a) {results['a_model_only']}", flush=True)
        results["c_naive"] = naive_loop(args, endpoint, "n/", workdir)
        print(f"bench: (c) {results['c_naive']}", flush=True)

    b, a, c = results["b_pipeline"], results["a_model_only"], results["c_naive"]
    peak_n, peak_scaled = (
        b["peak_rss_mb"]["total_mb"],
        results["b_pipeline_scaled"]["peak_rss_mb"]["total_mb"],
    )
    results["ratios"] = {
        "b_over_a_steady": _ratio(b["images_per_s_steady"], a["images_per_s"]),
        "b_over_a_end_to_end": _ratio(b["images_per_s_end_to_end"], a["images_per_s"]),
        "b_over_c_steady": _ratio(b["images_per_s_steady"], c["images_per_s"]),
        "b_over_c_end_to_end": _ratio(b["images_per_s_end_to_end"], c["images_per_s"]),
        "peak_rss_scaled_over_n": _ratio(peak_scaled, peak_n),
    }
    print(json.dumps(results, indent=2, default=str))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
