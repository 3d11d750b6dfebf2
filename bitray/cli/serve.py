"""``bitray serve``: the online API (embed, classify, search, thumbnails, the page) on Ray Serve."""

from __future__ import annotations

import argparse
import logging
import sys

from bitray.cli.args import address_parent, config_field, config_overrides
from bitray.serve.config import ServeConfig

log = logging.getLogger(__name__)


def _field(name: str):  # noqa: ANN202 - an argparse type
    return config_field(ServeConfig, name)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        parents=[
            address_parent(
                "Ray cluster to deploy on (default: RAY_ADDRESS, else a local Ray that "
                "lives as long as this command)"
            )
        ],  # fmt: skip
        help="serve embeddings, a classifier and index search over HTTP (Ray Serve)",
        description="Start a Ray Serve application: POST /embed, /classify, /search; GET /thumbnail, "
        "/healthz, /config and a web page at /. Locally it runs until Ctrl-C; with --address it is deployed "
        "on the cluster and keeps running (stop it with `serve shutdown`). --write-config FILE writes the "
        "same application as a config for `serve deploy` instead. Flags override the config file. Example: "
        "bitray serve --index s3://bucket/emb/_index --classifier models:/pets@champion",
    )
    parser.add_argument("--model", metavar="SPEC", help="embedding model (default: the index's model)")
    parser.add_argument(
        "--classifier", metavar="SPEC", help="savedmodel:DIR/classifier or models:/NAME@ALIAS"
    )
    parser.add_argument("--index", metavar="URI", help="a bitray index for /search and /thumbnail")
    parser.add_argument("--config", metavar="FILE.yaml", help="ServeConfig YAML (keys as the flags, with _)")
    parser.add_argument("--host", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=_field("port"), metavar="PORT", help="HTTP port (default 8000)")
    parser.add_argument("--replicas-min", type=_field("replicas_min"), metavar="N", help="per model (1)")
    parser.add_argument("--replicas-max", type=_field("replicas_max"), metavar="N", help="per model (2)")
    parser.add_argument("--batch-size", type=_field("batch_size"), metavar="N",
                        help="largest batch a model replica runs (16)")  # fmt: skip
    parser.add_argument("--batch-wait-s", type=_field("batch_wait_s"), metavar="S",
                        help="how long a replica waits for a batch to fill (0.005)")  # fmt: skip
    parser.add_argument("--max-ongoing-requests", type=_field("max_ongoing_requests"), metavar="N",
                        help="requests one ingress replica holds at once (32)")  # fmt: skip
    parser.add_argument("--max-bytes", type=_field("max_bytes"), metavar="N",
                        help="largest request body in bytes (32 MiB)")  # fmt: skip
    parser.add_argument("--k-max", type=_field("k_max"), metavar="K", help="most results per request (100)")
    parser.add_argument("--write-config", metavar="FILE.yaml",
                        help="write a `serve deploy` config for these settings and exit")  # fmt: skip
    parser.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from bitray.config import load_config
    from bitray.errors import BitrayError

    config = load_config(ServeConfig, args.config, config_overrides(ServeConfig, args))
    if config.model is None and config.index is None:
        raise BitrayError("nothing to serve: give --model SPEC (an embedding model), --index URI, or both")
    if not config.is_loopback():
        print(
            f"bitray: warning: binding {config.host}: the API (and every indexed image's thumbnail) is "
            "reachable from other machines, without authentication",
            file=sys.stderr,
        )
    if args.write_config:
        return write_config(config, args.write_config)
    return start(config, args.address)


def write_config(config: ServeConfig, path: str) -> int:
    import yaml

    from bitray.serve.app import serve_config

    with open(path, "w", encoding="utf-8") as out:
        yaml.safe_dump(serve_config(config), out, sort_keys=False)
    print(f"bitray: wrote {path}; deploy it with: serve deploy {path}")
    return 0


def start(config: ServeConfig, address: str | None) -> int:
    """Run the application; locally until Ctrl-C, on a cluster deployed and left running."""
    from ray import serve

    from bitray.errors import BitrayError
    from bitray.ray_session import connect
    from bitray.serve.app import APP_NAME, build

    connect(address)
    serve.start(http_options={"host": config.host, "port": config.port})
    try:
        serve.run(build(config), name=APP_NAME, route_prefix="/")
    except RuntimeError as exc:  # a replica's constructor failed: Serve gives its traceback as text
        lines = [line for line in str(exc).splitlines() if "Error:" in line]
        raise BitrayError(f"the application did not start: {(lines or [str(exc)])[-1].strip()}") from None
    url = f"http://{config.host}:{config.port}/"
    print(f"bitray: serving at {url} (metrics: Ray's Prometheus endpoint, ray_serve_* series)")
    if address is not None:
        print(f"bitray: deployed on {address}; stop it with: serve shutdown")
        return 0
    import threading

    try:
        threading.Event().wait()
    finally:
        serve.shutdown()
    return 0
