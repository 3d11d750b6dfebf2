"""``bitray index | search | duplicates | evaluate``: use an embedding output (see ``bitray.search``)."""

from __future__ import annotations

import argparse
import json
import sys

from bitray.cli.args import cosine, fraction, int_in, positive_int, seed


def register(subparsers: argparse._SubParsersAction) -> None:
    index = subparsers.add_parser(
        "index",
        help="build or update the nearest-neighbour index of an embedding output",
        description="Index the finished runs of an embedding output (exact below --exact-below vectors, "
        "IVF from there); run it again to add only the runs finished since.",
    )
    index.add_argument(
        "--embeddings", required=True, metavar="OUT", help="embedding output (bitray embed --output)"
    )
    index.add_argument("--index", metavar="URI", help="where the index lives (default OUT/_index)")
    index.add_argument(
        "--exact-below", type=positive_int, metavar="N", help="exact search below N vectors (20000)"
    )
    index.add_argument(
        "--nprobe", type=positive_int, metavar="N", help="IVF cells a query scans (default 15%%, >= 16)"
    )
    index.add_argument(
        "--max-index-memory",
        metavar="SIZE",
        help="memory the index may take, e.g. 16G (2G): IVF-Flat while it fits, compressed IVF-PQ from there",
    )
    index.add_argument(
        "--files-per-shard", type=positive_int, metavar="N", help="embedding files per shard (16)"
    )
    index.add_argument("--address", metavar="ADDR", help="Ray cluster of a compressed build (RAY_ADDRESS)")
    index.set_defaults(func=run_index)

    search = subparsers.add_parser(
        "search",
        help="nearest neighbours of an image, or of a path in the index",
        description="Print the k nearest neighbours (path, cosine similarity) of an image embedded with the "
        "index's model, or of an image the index holds.",
    )
    search.add_argument("--index", required=True, metavar="URI")
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("--image", metavar="FILE_OR_URI", help="an image to embed and look up")
    query.add_argument("--path", metavar="PATH", help="an object URI as the embedding output records it")
    search.add_argument(
        "-k",
        type=positive_int,
        default=10,
        metavar="K",
        help="neighbours to return (10; at most the index size)",
    )
    search.add_argument(
        "--nprobe", type=positive_int, metavar="N", help="IVF cells to scan (default: the index's)"
    )
    search.add_argument("--sheet", metavar="OUT.png", help="also write a contact sheet of query and results")
    search.add_argument(
        "--address",
        metavar="ADDR",
        help="Ray cluster running the index's search service (bitray search-service)",
    )
    search.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    search.set_defaults(func=run_search)

    service = subparsers.add_parser(
        "search-service",
        help="start (or stop) the Ray search service of a compressed index",
        description="Start detached Ray actors holding the index's shards warm; bitray search --address "
        "then answers from them. Prints the service's generation, shards and actors.",
    )
    service.add_argument("--index", required=True, metavar="URI")
    service.add_argument("--address", metavar="ADDR", help="Ray cluster (default RAY_ADDRESS, else local)")
    service.add_argument(
        "--actors", type=positive_int, default=1, metavar="N", help="shard-holding actors (1)"
    )
    service.add_argument("--reload", action="store_true", help="follow index.json after an update")
    service.add_argument("--stop", action="store_true", help="stop the running service")
    service.set_defaults(func=run_service)

    duplicates = subparsers.add_parser(
        "duplicates",
        help="groups of near-identical images of an index, exact copies flagged",
        description="Write every group of images whose cosine similarity reaches --threshold to Parquet.",
    )
    duplicates.add_argument("--index", required=True, metavar="URI")
    duplicates.add_argument(
        "--threshold", type=cosine, default=0.95, metavar="COS", help="cosine similarity, -1 to 1 (0.95)"
    )
    duplicates.add_argument("--output", required=True, metavar="OUT.parquet")
    duplicates.add_argument("--sheet", metavar="OUT.png", help="contact sheet of the largest groups")
    duplicates.set_defaults(func=run_duplicates)

    evaluate = subparsers.add_parser(
        "evaluate",
        help="kNN and linear-probe top-1 of an embedding output; gate it against a baseline output",
        description="Score the embeddings on labelled images; with --baseline, exit 1 when any metric is "
        "worse than the baseline's by more than --tolerance.",
    )
    evaluate.add_argument("--embeddings", required=True, metavar="OUT")
    evaluate.add_argument(
        "--labels", required=True, metavar="LABELS", help="path,label CSV/Parquet or class folders"
    )
    evaluate.add_argument("--baseline", metavar="OUT2", help="embedding output of the model to beat")
    evaluate.add_argument(
        "--tolerance", type=fraction, default=0.01, help="allowed drop per metric, 0 to 1 (0.01)"
    )
    evaluate.add_argument(
        "--few-shot", type=positive_int, metavar="K", help="also K-shot linear probe and 1-NN (K >= 1)"
    )
    evaluate.add_argument(
        "--folds", type=int_in(2), default=5, help="stratified cross-validation folds, >= 2 (5)"
    )
    evaluate.add_argument("--seed", type=seed, default=0)
    evaluate.add_argument(
        "--tracking-uri", metavar="URI", help="MLflow (default MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)"
    )
    evaluate.add_argument("--json", action="store_true", help="print the evaluation(s) as JSON")
    evaluate.set_defaults(func=run_evaluate)


def run_index(args: argparse.Namespace) -> int:
    """``bitray index --embeddings s3://bucket/emb --index s3://bucket/emb-index``"""
    from bitray.search.index import IndexOptions, update_index
    from bitray.search.params import parse_memory

    defaults = IndexOptions()
    options = IndexOptions(
        exact_below=defaults.exact_below if args.exact_below is None else args.exact_below,
        nprobe=args.nprobe,
        max_index_memory=parse_memory(args.max_index_memory or defaults.max_index_memory),
        files_per_shard=args.files_per_shard or defaults.files_per_shard,
        address=args.address,
    )
    report = update_index(args.embeddings, args.index, options=options)
    print(json.dumps(report.to_dict(), indent=2))
    return 0


def run_search(args: argparse.Namespace) -> int:
    """``bitray search --index ./out/_index --image cat.jpg -k 5 --sheet cat.png``"""
    from bitray.search.index import load_index, resolve_index
    from bitray.search.query import search, sheet_items
    from bitray.search.scope import IndexReads
    from bitray.search.sheet import contact_sheet, write_png

    index_uri = resolve_index(args.index)
    index = _service(args.index, index_uri, args.address) if args.address else None
    index = index or load_index(index_uri)
    results = search(index, image=args.image, path=args.path, k=args.k, nprobe=args.nprobe)
    if args.json:
        for row in results.select(["rank", "path", "similarity"]).to_pylist():
            print(json.dumps(row))
    else:
        for rank, path, similarity in zip(
            *(results.column(c).to_pylist() for c in ("rank", "path", "similarity")), strict=True
        ):
            print(f"{rank:>3}  {similarity:.4f}  {path}")
    if args.sheet:
        reads = IndexReads.of_output(index.meta.embeddings).allow(*([args.image] if args.image else []))
        write_png(contact_sheet(sheet_items(args.image or args.path, results), read=reads.read), args.sheet)
        print(f"bitray: contact sheet in {args.sheet}", file=sys.stderr)
    return 0


def _service(given: str, index_uri: str, address: str):  # noqa: ANN202
    """The running search service of ``given`` (a collection root, an output or an index) or of the index
    it resolves to, ``index_uri``, on the cluster at ``address``; None (told) when neither runs."""
    from bitray.ray_session import connect
    from bitray.search.service import SearchService

    connect(address)
    service = SearchService.connect(given.rstrip("/")) or SearchService.connect(index_uri.rstrip("/"))
    if service is None:
        print(
            f"bitray: no search service of {index_uri} at {address}; loading the index here", file=sys.stderr
        )
    return service


def run_service(args: argparse.Namespace) -> int:
    """``bitray search-service --index s3://bucket/emb/_index --actors 4`` (``--stop`` to stop it)"""
    from bitray.ray_session import connect
    from bitray.search.service import SearchService

    connect(args.address)
    # named by the URI given: a service of a collection root follows its switches to other versions
    index_uri = args.index.rstrip("/")
    service = SearchService.connect(index_uri)
    if args.stop:
        if service is not None:
            service.stop()
        print(f"bitray: search service of {args.index} {'stopped' if service else 'was not running'}")
        return 0
    if service is not None and args.reload:
        service.reload()
    service = service or SearchService.start(index_uri, actors=args.actors)
    info = {k: v for k, v in service.info.items() if k != "meta"}
    print(json.dumps({"index": args.index, **info}))
    return 0


def run_duplicates(args: argparse.Namespace) -> int:
    """``bitray duplicates --index ./out/_index --threshold 0.95 --output dups.parquet --sheet dups.png``"""
    from bitray.search import duplicates
    from bitray.search.index import load_index, resolve_index
    from bitray.search.scope import IndexReads
    from bitray.search.sheet import contact_sheet, write_png

    index = load_index(resolve_index(args.index))
    table = duplicates.find_duplicates(index, duplicates.DuplicateOptions(args.threshold))
    duplicates.write_duplicates(table, args.output)
    groups = len(set(table.column("group").to_pylist()))
    exact = sum(
        e and not r
        for e, r in zip(
            table.column("exact").to_pylist(), table.column("representative").to_pylist(), strict=True
        )
    )
    print(f"bitray: {groups} group(s), {table.num_rows} image(s), {exact} exact copies -> {args.output}")
    if args.sheet and table.num_rows:
        reads = IndexReads.of_output(index.meta.embeddings)
        write_png(contact_sheet(duplicates.sheet_items(table), read=reads.read), args.sheet)
        print(f"bitray: contact sheet in {args.sheet}", file=sys.stderr)
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    """``bitray evaluate --embeddings ./tuned-emb --labels ./digits --baseline ./base-emb`` (exit 1: worse)"""
    import os

    from bitray.outputs import data_path
    from bitray.redaction import redacted
    from bitray.search.evaluate import EvalOptions, evaluate, evaluate_pair, format_table, gate, log_to_mlflow

    options = EvalOptions(folds=args.folds, seed=args.seed, few_shot=args.few_shot)
    embeddings = data_path(args.embeddings)  # a collection root: its current version, read once
    if args.baseline:
        new, baseline = evaluate_pair(embeddings, data_path(args.baseline), args.labels, options)
    else:
        new, baseline = evaluate(embeddings, args.labels, options), None
    tracking = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    run_id = log_to_mlflow(new, baseline, args.tolerance, args.labels, tracking)
    if args.json:
        print(
            json.dumps({"new": new.to_dict(), "baseline": baseline.to_dict() if baseline else None}, indent=2)
        )
    else:
        print(format_table(new, baseline, args.tolerance))
    if run_id:
        print(f"bitray: logged to MLflow run {run_id} at {redacted(tracking)}", file=sys.stderr)
    if baseline is not None and not gate(new, baseline, args.tolerance)[0]:
        return 1
    return 0
