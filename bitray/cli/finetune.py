"""``bitray finetune``: HyperRule fine-tuning of BiT on a labelled image set with Ray Train + MLflow."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from bitray.cli.args import Bounded, address_parent, config_field, config_overrides
from bitray.config import FinetuneConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "finetune",
        parents=[address_parent()],
        help="fine-tune BiT on a labelled image set (Ray Train workers, tracked in MLflow)",
        description="Fine-tune a BiT model with the HyperRule on a folder-per-class tree or a path,label "
        "manifest, export TF-Hub-style SavedModels to --output, and register the model in MLflow. "
        "Rerunning with the same run name resumes it. Flags override the config file.",
    )
    parser.add_argument("--data", metavar="URI", help="labelled set: <root>/<label>/<image> or .csv/.parquet")
    parser.add_argument("--validation", metavar="URI", help="separate validation set (default: split --data)")
    parser.add_argument("--output", metavar="URI", help="where the exported SavedModels go")
    parser.add_argument("--model", metavar="SPEC", help="bit-m-r50x1 (default), npz:PATH, savedmodel:DIR")
    parser.add_argument("--config", metavar="FILE.yaml", help="FinetuneConfig YAML (pipelines/configs/)")
    parser.add_argument(
        "--workers", type=_field("workers"), metavar="N", help="Ray Train workers (default 1)"
    )
    parser.add_argument(
        "--gpus-per-worker", type=_field("gpus_per_worker"), metavar="G", help="GPUs per worker (default 0)"
    )
    parser.add_argument(
        "--steps", type=_field("steps"), metavar="N", help="total steps (default: by the HyperRule)"
    )
    parser.add_argument(
        "--batch-size", type=_field("batch_size"), metavar="N", help="global batch (default 512)"
    )
    parser.add_argument(
        "--micro-batch", type=_field("micro_batch"), metavar="N", help="global images per pass (accumulate)"
    )
    parser.add_argument(
        "--examples-per-class",
        type=_field("examples_per_class"),
        metavar="K",
        help="few-shot: a seeded draw of K images per class",
    )
    parser.add_argument(
        "--promote",
        choices=("if_better", "always"),
        help="move the registry alias: on merit (default) or always",
    )
    parser.add_argument("--name", metavar="NAME", help="run name; the same name resumes a run")
    parser.set_defaults(func=run)


def _field(name: str) -> Bounded:
    return config_field(FinetuneConfig, name)


def run(args: argparse.Namespace) -> int:
    from bitray.config import load_config
    from bitray.finetune import run_finetune

    config = load_config(FinetuneConfig, args.config, config_overrides(FinetuneConfig, args))
    result = run_finetune(config, address=args.address)
    print(json.dumps(asdict(result), indent=2))
    print(f"bitray: embed with it: bitray embed --model savedmodel:{result.feature_vector_uri} ...")
    print(f"bitray: classify with it: load_model('savedmodel:{result.classifier_uri}', classifier=True)")
    return 0
