"""``bitray outputs ROOT`` and ``bitray outputs add|switch|retire|gc|migrate``: the versions of an output."""

from __future__ import annotations

import argparse
import json
import re

from bitray.cli.args import fraction
from bitray.errors import BitrayError

ACTIONS = {"add": 2, "switch": 2, "retire": 2, "gc": 1, "migrate": 1}
"""Each action and how many words follow it (ROOT, and VERSION but for gc)."""
USAGE = (
    "bitray outputs ROOT | add ROOT VERSION --model SPEC | switch ROOT VERSION | retire ROOT VERSION "
    "| gc ROOT --keep AGE | migrate ROOT"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "outputs",
        help="list the versions of an embedding output, or add, switch, retire, delete one",
        usage=f"{USAGE} [options]",
        description="An output root holds one version per model, one current (bitray.collection). "
        "'bitray outputs ROOT' lists them and prints the current version's data path (the path pandas, "
        "DuckDB or Spark read); 'add' makes a version to embed into, 'switch' indexes a version and makes "
        "it current (gated with --labels), 'retire' marks one for deletion, 'gc' deletes retired ones, "
        "'migrate' moves the data of an output made before collections (version v0, at ROOT itself) under "
        "ROOT/versions/v0.",
    )
    parser.add_argument("words", nargs="+", metavar="ACTION_OR_ROOT", help="see usage")
    parser.add_argument("--model", metavar="SPEC", help="add: the model the version is embedded with")
    parser.add_argument("--expect", metavar="VERSION", help="switch: only if VERSION is current now")
    parser.add_argument("--labels", metavar="LABELS", help="switch: gate on these labelled images first")
    parser.add_argument(
        "--tolerance", type=fraction, default=0.01, help="switch: allowed drop per metric, 0 to 1 (0.01)"
    )
    parser.add_argument(
        "--keep", metavar="AGE", help="gc: keep versions retired less than AGE ago (7d, 12h, 0)"
    )
    parser.add_argument("--json", action="store_true", help="list: print JSON")
    parser.set_defaults(func=run_outputs)


def run_outputs(args: argparse.Namespace) -> int:
    """``bitray outputs s3://bucket/emb`` / ``bitray outputs switch s3://bucket/emb bitray-pets-4``"""
    words = args.words
    action = words[0] if words[0] in ACTIONS else "list"
    operands = words[1:] if action != "list" else words
    wanted = ACTIONS.get(action, 1)
    if len(operands) != wanted:
        raise BitrayError(f"'bitray outputs {' '.join(words)}': expected {USAGE}")
    actions = {"list": _list, "add": _add, "switch": _switch, "retire": _retire, "gc": _gc}
    return {**actions, "migrate": _migrate}[action](args, *operands)


def _list(args: argparse.Namespace, root: str) -> int:
    from bitray import outputs

    rows, current = outputs.versions(root)
    if not rows:
        raise BitrayError(
            f"{root} holds no embedding output; embed into it with bitray embed --output {root}"
        )
    if args.json:
        print(json.dumps({"root": root, "current": current, "versions": rows}, indent=1))
        return 0
    print(f"{'version':<22}{'state':<13}{'images':>8}{'errors':>8}  model")
    for row in rows:
        model = row["model"] or "-"
        model += f" ({row['model_id']})" if row["model_id"] else ""
        print(f"{row['name']:<22}{row['state']:<13}{row['images']:>8}{row['errors']:>8}  {model}")
        if row["gate"]:
            print(f"{'':<22}gate {'passed' if row['gate']['passed'] else 'FAILED'}: {row['gate']['reason']}")
    print(f"current: {current}" if current else "current: none")
    return 0


def _add(args: argparse.Namespace, root: str, name: str) -> int:
    from bitray.collection import Collection
    from bitray.embed.settings import resolved_model

    if not args.model:
        raise BitrayError("bitray outputs add needs --model SPEC: the model the new version embeds with")
    version = Collection(root).add(name, model=args.model, resolved=resolved_model(args.model))
    print(f"bitray: version {name} of {root} added; embed into it with:")
    print(f"  bitray embed --input PREFIX --output {version.uri} --model {version.record.resolved}")
    return 0


def _switch(args: argparse.Namespace, root: str, name: str) -> int:
    from bitray.promote import Gate, promote

    gate = Gate(args.labels, args.tolerance) if args.labels else None
    done = promote(root, name, gate=gate, expect=args.expect)
    if done.gate is not None:
        print(f"bitray: gate {'passed' if done.gate.passed else 'FAILED'}: {done.gate.reason}")
    if not done.switched:
        print(f"bitray: {root} stays on {done.previous}")
        return 1
    print(
        f"bitray: {root} switched from {done.previous or 'none'} to {name}"
        + (f"; index {done.index}" if done.index else "")
    )
    return 0


def _retire(args: argparse.Namespace, root: str, name: str) -> int:
    from bitray.collection import Collection

    Collection(root).retire(name)
    print(f"bitray: version {name} of {root} retired; bitray outputs gc {root} --keep AGE deletes it")
    return 0


def _gc(args: argparse.Namespace, root: str) -> int:
    from bitray.collection import Collection

    if args.keep is None:
        raise BitrayError(
            "bitray outputs gc needs --keep AGE (e.g. 7d, 12h, 30m, 0): retired versions younger stay"
        )
    deleted = Collection(root).gc(parse_age(args.keep))
    print(f"bitray: deleted {', '.join(deleted)}" if deleted else "bitray: nothing to delete")
    return 0


def _migrate(args: argparse.Namespace, root: str) -> int:
    from bitray.migrate import migrate

    done = migrate(root)
    moved = f"{done.objects} objects copied, verified and switched to" if done.objects else "already at"
    print(f"bitray: v0 of {root}: {moved} {done.data}" + (f"; index {done.index}" if done.index else ""))
    return 0


def parse_age(text: str) -> float:
    """``7d``, ``12h``, ``30m``, ``90s`` or ``0`` in seconds."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([dhms]?)", text.strip())
    if not match or (not match.group(2) and float(match.group(1)) != 0):
        raise BitrayError(f"--keep {text!r}: give an age such as 7d, 12h, 30m, 90s, or 0")
    return float(match.group(1)) * {"d": 86400, "h": 3600, "m": 60, "s": 1, "": 0}[match.group(2)]
