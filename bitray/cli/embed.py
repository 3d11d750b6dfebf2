"""``bitray embed`` (images -> Parquet of BiT embeddings) and ``bitray demo`` (the same on sample photos)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from bitray.cli.args import address_parent, config_field, config_overrides, int_in, non_negative_int
from bitray.config import MIN_IMAGE_SIZE, EmbedConfig

DEMO_MODEL = "bit-s-r101x1"
DEMO_FALLBACK = "random:r101x1"


def register(subparsers: argparse._SubParsersAction) -> None:
    embed = subparsers.add_parser(
        "embed",
        parents=[address_parent()],
        help="embed images from object storage or local paths into Parquet",
        description="Embed every image under the inputs with BiT, exactly once, into Parquet under --output. "
        "Flags override the config file, which overrides the defaults.",
    )
    embed.add_argument(
        "--input",
        dest="inputs",
        action="append",
        metavar="URI",
        help="s3://, gs:// or local prefix or file (repeatable)",
    )
    embed.add_argument("--manifest", metavar="URI", help="file listing input URIs, one per line")
    embed.add_argument("--output", metavar="URI", help="output prefix (default ./bitray-output/embeddings)")
    embed.add_argument(
        "--model",
        metavar="SPEC",
        help="bit-s-r101x1 (default), hub:URL, npz:PATH, savedmodel:DIR, models:/NAME@ALIAS or random:ARCH",
    )
    embed.add_argument(
        "--config", metavar="FILE.yaml", help="EmbedConfig YAML (see pipelines/configs/embed.yaml)"
    )
    embed.add_argument("--run-id", metavar="ID", help="resume (or re-run, a no-op when finished) this run")
    embed.add_argument(
        "--incremental",
        action="store_true",
        default=None,
        help="embed only object versions not yet recorded under --output",
    )
    embed.add_argument(
        "--retry-errors",
        action="store_true",
        default=None,
        help="take again the images recorded as errors under --output (alone: without listing the inputs; "
        "with --incremental: beside what is new)",
    )
    embed.add_argument(
        "--batch-size",
        type=config_field(EmbedConfig, "batch_size"),
        metavar="N",
        help="images per model call",
    )
    embed.add_argument(
        "--rows-per-file",
        type=config_field(EmbedConfig, "rows_per_file"),
        metavar="N",
        help="images per output Parquet file (default 8192)",
    )
    embed.add_argument(
        "--shared-storage",
        action="store_true",
        default=None,
        help="local paths are mounted at the same place on every Ray node (checked)",
    )
    embed.add_argument(
        "--dry-run",
        action="store_true",
        help="list and compare with earlier runs, print what a run would do; write nothing, start no Ray",
    )
    embed.add_argument(
        "--image-size", type=int_in(MIN_IMAGE_SIZE), metavar="PX", help="model input size (default 224)"
    )
    embed.add_argument(
        "--actors", type=actor_pool, metavar="MIN[:MAX]", help="autoscaling embedding actor pool size"
    )
    embed.add_argument("--gpus-per-actor", type=config_field(EmbedConfig, "gpus_per_actor"), metavar="N")
    embed.add_argument("--cpus-per-actor", type=config_field(EmbedConfig, "cpus_per_actor"), metavar="N")
    embed.add_argument(
        "--cpu-precision",
        choices=["float32", "bfloat16"],
        help="CPU actors' compute (default float32); bfloat16 needs avx512_bf16 or amx_bf16 and an "
        "npz: or random: model",
    )
    embed.add_argument(
        "--decode",
        choices=("fast", "exact"),
        help="fast (default): DCT-scaled JPEG decode and box reduction before the resize; "
        "exact: full-resolution decode, bit-identical pixels",
    )
    embed.add_argument(
        "--max-decode-mb",
        type=config_field(EmbedConfig, "max_decode_mb"),
        metavar="MB",
        help="memory one image's decode may take (default 1200)",
    )
    embed.set_defaults(func=run_embed)

    errors = subparsers.add_parser(
        "errors",
        help="the open errors of an embedding output: what --retry-errors would take",
        description="List the object versions whose latest result under OUTPUT is an error row, counted by "
        "stage and error type. Errors of versions changed or deleted since are not open.",
    )
    errors.add_argument("output", metavar="OUTPUT", help="embedding output prefix")
    errors.add_argument(
        "--limit", type=non_negative_int, default=20, metavar="N", help="errors to print (default 20)"
    )
    errors.add_argument("--config", metavar="FILE.yaml", help="EmbedConfig YAML, for its storage settings")
    errors.set_defaults(func=run_errors)

    demo = subparsers.add_parser(
        "demo",
        parents=[address_parent("Ray cluster address (default: local)")],
        help="embed scikit-image's sample photos on a local Ray (the quickstart)",
        description=f"Write scikit-image's sample photos to DIR/photos and embed them into DIR/output with "
        f"{DEMO_MODEL} (or, when its weights cannot be loaded, random weights, said loudly). "
        "DIR/output is replaced on every demo run.",
    )
    demo.add_argument(
        "--output", metavar="DIR", default="./bitray-demo", help="demo directory (./bitray-demo)"
    )
    demo.add_argument(
        "--model", metavar="SPEC", help=f"model spec (default {DEMO_MODEL}, else {DEMO_FALLBACK})"
    )
    demo.add_argument("--image-size", type=int_in(MIN_IMAGE_SIZE), default=224, metavar="PX")
    demo.set_defaults(func=run_demo, address="local")


def run_embed(args: argparse.Namespace) -> int:
    from bitray.config import load_config
    from bitray.embed import dry_run_embedding, run_embedding

    overrides = {**config_overrides(EmbedConfig, args), **(args.actors or {})}
    config = load_config(EmbedConfig, args.config, overrides)
    if args.dry_run:
        print_dry_run(dry_run_embedding(config))
        return 0
    summary = run_embedding(config, address=args.address)
    print_summary(summary)
    if config.index:
        from bitray.collection import Collection
        from bitray.search.index import update_index

        # a version of a collection (bitray.collection) has its own index, at the version's _index
        own = summary.output.rstrip("/") == Collection(config.output, config.storage).root
        report = update_index(summary.output, config.index if own else None, storage_config=config.storage)
        print(f"bitray: index {report.index}: {report.count} vectors, {report.added} added", flush=True)
    return 0


def run_errors(args: argparse.Namespace) -> int:
    from collections import Counter

    from bitray.config import load_config
    from bitray.outputs import open_errors

    config = load_config(EmbedConfig, args.config, {"output": args.output})
    found = open_errors(config.output, config.storage)
    print(f"bitray: {len(found)} open error(s) under {config.output}")
    kinds = Counter((row.stage, row.error.partition(":")[0]) for row in found)
    for (stage, kind), count in kinds.most_common():
        print(f"  {count:>10,}  {stage:<7} {kind}")
    for row in found[: args.limit]:
        print(f"{row.object.uri}\t{row.stage}\t{row.error}")
    if len(found) > args.limit:
        print(f"... and {len(found) - args.limit:,} more; bitray.outputs.open_errors() lists them all")
    if found:
        print(f"bitray: take them again with: bitray embed --output {config.output} --retry-errors")
    return 0


def actor_pool(text: str) -> dict[str, int]:
    """``--actors MIN[:MAX]`` as config fields; argparse reports a bad value as the flag's error."""
    low, _, high = text.partition(":")
    try:
        pool = {"actors_min": int(low), "actors_max": int(high or low)}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write MIN or MIN:MAX, e.g. 1:4") from None
    if not 1 <= pool["actors_min"] <= pool["actors_max"]:
        raise argparse.ArgumentTypeError(f"{text!r}: write 1 <= MIN <= MAX, e.g. 1:4")
    return pool


def print_summary(summary, kind: str = "embeddings") -> None:  # noqa: ANN001 - bitray.embed.RunSummary
    print(f"bitray: {kind} in {summary.output}/{kind}/, errors in {summary.output}/errors/")
    print(json.dumps(summary.to_dict(), indent=2))


def print_dry_run(plan) -> None:  # noqa: ANN001 - bitray.embed.plan.DryRun, imported lazily
    counts = plan.counts
    size = f"{plan.estimated_bytes / 2**30:.2f} GiB" if plan.estimated_bytes is not None else "unknown"
    dim = plan.feature_dim or "unknown"
    print(f"bitray: dry run of {'an incremental' if plan.incremental else 'a'} run into {plan.output}")
    print(f"  listed     {counts.listed:>12,}")
    print(f"  new        {counts.new:>12,}")
    print(f"  changed    {counts.changed:>12,}")
    print(f"  unchanged  {counts.unchanged:>12,}")
    print(f"  retried    {counts.retried:>12,}  (recorded errors taken again)")
    print(f"  model      {plan.model} ({dim}-d embeddings)")
    print(f"  files      {plan.files:>12,} embeddings file(s) of up to {plan.rows_per_file:,} rows, ~{size}")
    if plan.unfinished_runs:
        print(f"  first finishes the interrupted run(s) {', '.join(plan.unfinished_runs)}")
    if plan.refused:
        print(f"  refused: {plan.refused}")
    print(json.dumps(plan.to_dict(), default=str))


def run_demo(args: argparse.Namespace) -> int:
    from bitray.embed import run_embedding
    from bitray.examples import write_sample_photos

    root = Path(args.output).expanduser().absolute()
    photos = write_sample_photos(root / "photos")
    output = root / "output"
    if (output / "_bitray").is_dir():
        shutil.rmtree(output)  # the demo's own output from an earlier demo run
    model = args.model or choose_demo_model()
    config = EmbedConfig(
        inputs=[str(photos)], output=str(output), model=model, image_size=args.image_size, batch_size=8
    )
    summary = run_embedding(config, address=args.address)
    print_summary(summary)
    if "random-init" in (summary.model_id or ""):
        print(random_weights_banner(summary.model_id))
    print(f"bitray: read them with: pandas.read_parquet('{output}/embeddings')")
    return 0


def choose_demo_model() -> str:
    """The real BiT-S R101x1 when its weights load here (TF-Hub or its cache), else random weights."""
    from bitray.errors import BitrayError
    from bitray.model import load_model

    try:
        load_model(DEMO_MODEL)
    except (BitrayError, OSError, ValueError) as exc:
        print(random_weights_banner(DEMO_FALLBACK, f"{DEMO_MODEL} weights could not be loaded: {exc}"))
        return DEMO_FALLBACK
    return DEMO_MODEL


def random_weights_banner(model: str, reason: str = "") -> str:
    line = "!" * 78
    text = [
        line,
        f"!! WARNING: RANDOM WEIGHTS ({model}): these embeddings are NOT BiT features.",
        "!! The model id in the output says random-init. To use the real model, give its weights:",
        "!!   bitray demo --model npz:/path/to/BiT-S-R101x1.npz   (or a TF-Hub cache / savedmodel:DIR)",
    ]
    if reason:
        text.insert(1, f"!! {reason}")
    return "\n".join([*text, line])
