"""Command line of the library: `python -m alignment store list [--json] [--root DIR]`."""

from __future__ import annotations

import argparse
import json
import sys

from alignment.store import Store


def _headline(metrics: dict) -> str:
    parts = []
    for key in ("eval_loss", "eval_accuracy"):
        if isinstance(metrics.get(key), (int, float)):
            parts.append(f"{key}={metrics[key]:.3f}")
    for mode in ("greedy", "sampled"):
        section = metrics.get(mode, {})
        if "gold" in section:
            parts.append(f"{mode}_gold={section['gold']['sft']:.3f}->{section['gold']['ppo']:.3f}")
        if "kl" in section:
            parts.append(f"{mode}_kl={section['kl']:.2f}")
    return " ".join(parts)


def store_list(root: str, as_json: bool) -> None:
    checkpoints = Store(root).list()
    if as_json:
        print(json.dumps([c.summary() for c in checkpoints], indent=2, default=str))
        return
    if not checkpoints:
        print(f"no checkpoints in {root}/")
        return
    for c in checkpoints:
        m = c.manifest
        parents = ", ".join(m.get("parents") or []) or "-"
        print(f"{c.id:32s} {m['model']:16s} {m.get('created', '')[:19]:20s} <- {parents:28s} {_headline(c.metrics)}")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m alignment")
    commands = parser.add_subparsers(dest="command", required=True)
    store = commands.add_parser("store", help="inspect the checkpoint store")
    store_commands = store.add_subparsers(dest="store_command", required=True)
    listing = store_commands.add_parser("list", help="runs, stages, lineage and headline metrics")
    listing.add_argument("--root", default="store", help="store root (default: ./store)")
    listing.add_argument("--json", action="store_true", help="print a JSON list of checkpoint objects")
    args = parser.parse_args(argv)
    if args.command == "store" and args.store_command == "list":
        store_list(args.root, args.json)


if __name__ == "__main__":
    main(sys.argv[1:])
