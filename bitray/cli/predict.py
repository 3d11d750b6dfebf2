"""``bitray predict``: a fine-tuned classifier over a bucket, exactly once, into Parquet (the embedding
pipeline's machinery with a classifier head)."""

from __future__ import annotations

import argparse

from bitray.cli.args import address_parent, config_field, config_overrides, int_in
from bitray.config import MIN_IMAGE_SIZE, EmbedConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    predict = subparsers.add_parser(
        "predict",
        parents=[address_parent()],
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
    predict.add_argument("--top-k", type=config_field(EmbedConfig, "top_k"), metavar="K",
                         help="labels listed per image (default 5)")  # fmt: skip
    predict.add_argument("--image-size", type=int_in(MIN_IMAGE_SIZE), metavar="PX",
                         help="default: the size the model was fine-tuned at (its crop)")  # fmt: skip
    predict.add_argument("--config", metavar="FILE.yaml", help="EmbedConfig YAML (task is set to classify)")
    predict.add_argument("--run-id", metavar="ID", help="resume (or re-run, a no-op when finished) this run")
    predict.add_argument("--incremental", action="store_true", default=None,
                         help="classify only object versions not yet recorded under --output")  # fmt: skip
    predict.add_argument("--decode", choices=("fast", "exact"),
                         help="fast (default) or exact: full-resolution (bitray embed)")  # fmt: skip
    predict.set_defaults(func=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    from bitray.cli.embed import print_summary
    from bitray.config import load_config
    from bitray.embed import run_embedding

    trained = classifier_size(args.model)  # before Ray starts: a model without a head stops here
    overrides = {**config_overrides(EmbedConfig, args), "task": "classify"}
    overrides["image_size"] = args.image_size or trained
    config = load_config(EmbedConfig, args.config, overrides)
    print_summary(run_embedding(config, address=args.address), kind="predictions")
    return 0


def classifier_size(spec: str) -> int | None:
    """The side the classifier was evaluated at in fine-tuning (read from its export), if it says.

    Loading it with ``classifier=True`` is also the check that ``spec`` has a classifier head: a
    feature-vector model is refused here, with one message, before any Ray worker starts.
    """
    from bitray.errors import BitrayError
    from bitray.model import load_model

    loaded = load_model(spec, classifier=True)
    if loaded.num_classes is None:
        raise BitrayError(
            f"--model {spec}: {loaded.model_id} has no classifier head; give a fine-tuned classifier's "
            "export (savedmodel:DIR/classifier or models:/NAME@ALIAS)"
        )
    return loaded.image_size
