"""``bitray model info SPEC`` and ``bitray model export``: inspect a BiT model, write a TF-Hub module."""

from __future__ import annotations

import argparse

from bitray.cli.args import positive_int

SPECS = (
    "model specs: bit-s-r101x1 (TF-Hub handle; also bit-m-..., r50x1 ... r152x4), hub:URL, "
    "npz:PATH.npz (local, s3:// or gs://; a bare *.npz path works too), savedmodel:DIR, "
    "random:ARCH (deterministic random weights; ARCH is r50x1 ... r152x4 or tiny)"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    model = subparsers.add_parser(
        "model",
        help="inspect BiT models and export TF-Hub modules",
        description="Inspect BiT models and export them as TF-Hub-style SavedModels.",
        epilog=SPECS,
    )
    commands = model.add_subparsers(title="model commands", metavar="COMMAND")
    model.set_defaults(func=lambda args: _print_help(model))

    info = commands.add_parser(
        "info", help="variant, parameters, feature size and weights of a model spec", epilog=SPECS
    )
    info.add_argument("spec", help="model spec, e.g. bit-s-r101x1, npz:BiT-M-R50x1.npz, random:tiny")
    info.add_argument("--arch", help="check that the weights are this variant (e.g. R101x1)")
    info.add_argument("--num-classes", type=positive_int, help="add a logits head with this many classes")
    info.set_defaults(func=_info)

    export = commands.add_parser(
        "export",
        help="write a TF-Hub-style SavedModel (image features, or logits with --classifier)",
        description="Write a TF2 SavedModel usable as hub.KerasLayer(DIR) on float32 images in [0, 1]; "
        "hub.KerasLayer(DIR, trainable=True) fine-tunes it.",
        epilog=SPECS,
    )
    export.add_argument("--weights", required=True, help="model spec or path to an official .npz checkpoint")
    export.add_argument("--arch", help="variant the weights must be, e.g. R101x1 (read from .npz files)")
    export.add_argument("--output", required=True, help="new directory (local, s3:// or gs://)")
    export.add_argument("--classifier", action="store_true", help="export logits instead of features")
    export.add_argument(
        "--num-classes", type=positive_int, help="classes of the head (needed with --classifier)"
    )
    export.set_defaults(func=_export)


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _load(spec: str, args: argparse.Namespace):  # noqa: ANN202 - a LoadedModel; TF is imported lazily
    from bitray.model import load_model

    return load_model(spec, num_classes=args.num_classes, arch=args.arch)


def _info(args: argparse.Namespace) -> int:
    from bitray.model.bit import get_variant

    loaded = _load(args.spec, args)
    variant = get_variant(loaded.arch).describe() if loaded.arch else "unknown (not a bitray export)"
    head = f"{loaded.num_classes} classes" if loaded.num_classes else "none (outputs features)"
    print(f"variant:      {variant}")
    print(f"parameters:   {loaded.model.count_params():,}")
    print(f"feature size: {loaded.feature_dim}")
    print(f"head:         {head}")
    print(f"weights:      {loaded.model_id}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from bitray.errors import BitrayError
    from bitray.model.export import export_savedmodel

    if args.classifier and args.num_classes is None:
        raise BitrayError("--classifier needs --num-classes N (the head's class count)")
    loaded = _load(args.weights, args)
    path = export_savedmodel(loaded, args.output, classifier=args.classifier)
    width = loaded.num_classes if args.classifier else loaded.feature_dim
    kind = f"{'logits' if args.classifier else 'features'} [batch, {width}]"
    print(f"exported {loaded.model_id} to {path}: hub.KerasLayer({str(path)!r}) gives {kind}")
    return 0
