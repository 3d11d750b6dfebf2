"""``bitray predict``: a fine-tuned classifier over a bucket, exactly once, into Parquet (the embedding
pipeline's machinery with a classifier head)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    predict = subparsers.add_parser(
        "predict",
        help="classify images with a fine-tuned model into Parquet (label, score, top-k)",
        description="Classify every image under the inputs with a fine-tuned BiT classifier, exactly once, "
        "into OUTPUT/predictions/ (path, label, score, top_k_labels, top_k_scores, ...) and OUTPUT/errors/. "
        "Runs, resumes and --incremental work as for `bitray embed`. Example: bitray predict --model "
        "models:/bitray-pets@champion --input s3://bucket/photos/ --output s3://bucket/pets-predictions",
    )
    predict.add_argument("--model", metavar="SPEC", required=True,
                         help="savedmodel:DIR/classifier of a fine-tune, or models:/NAME@ALIAS")  # fmt: skip
    predict.add_argument("--input", dest="inputs", action="append", metavar="URI", help="repeatable")
    predict.add_argument("--manifest", metavar="URI", help="file listing input URIs, one per line")
    predict.add_argument("--output", metavar="URI", required=True, help="output prefix")
    predict.add_argument("--top-k", type=int, metavar="K", help="labels listed per image (default 5)")
    predict.add_argument("--image-size", type=int, metavar="PX",
                         help="default: the size the model was fine-tuned at (its crop)")  # fmt: skip
    predict.add_argument("--config", metavar="FILE.yaml", help="EmbedConfig YAML (task is set to classify)")
    predict.add_argument(
        "--address", metavar="ADDR", help="Ray cluster address (default: RAY_ADDRESS or local)"
    )
    predict.add_argument("--run-id", metavar="ID", help="resume (or re-run, a no-op when finished) this run")
    predict.add_argument("--incremental", action="store_true", default=None,
                         help="classify only object versions not yet recorded under --output")  # fmt: skip
    predict.add_argument("--decode", choices=("fast", "exact"),
                         help="fast (default) or exact: full-resolution (bitray embed)")  # fmt: skip
    predict.set_defaults(func=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    from bitray.cli.embed import print_summary
    from bitray.config import EmbedConfig, load_config
    from bitray.embed import run_embedding

    overrides = {
        "task": "classify",
        "inputs": args.inputs,
        "manifest": args.manifest,
        "output": args.output,
        "model": args.model,
        "top_k": args.top_k,
        "run_id": args.run_id,
        "incremental": args.incremental,
        "decode": args.decode,
        "image_size": args.image_size or trained_size(args.model),
    }
    config = load_config(EmbedConfig, args.config, overrides)
    print_summary(run_embedding(config, address=args.address), kind="predictions")
    return 0


def trained_size(spec: str) -> int | None:
    """The side the classifier was evaluated at in fine-tuning (read from its export), if it says."""
    from bitray.model import load_model

    return load_model(spec, classifier=True).image_size
