"""`dermaray models list | pull ROLE/NAME | push ROLE/NAME [--config FILE] [key=value ...]`.

    dermaray models pull note_writer/qwen2.5-7b models.offline=false            # into this machine's cache
    dermaray models push note_writer/qwen2.5-7b --config configs/cluster.yaml models.offline=false
                                                                               # mirror to models.store once

`push` is what a large cluster does to avoid hub rate limits and egress: one machine fetches the
snapshot from the hub and writes it to object storage; every node then pulls from there
(`models.store`), even with `models.offline: true`.
"""

from __future__ import annotations

import argparse
import sys

from dermaray.config import load_config


def main(argv: list[str]) -> None:
    from dermaray.models.registry import PRESETS, push_to_store, resolve_model

    parser = argparse.ArgumentParser(prog="dermaray models", description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["list", "pull", "push"])
    parser.add_argument("model", nargs="?", help="ROLE/NAME, e.g. note_writer/qwen2.5-7b or note_writer/hub:owner/repo")
    parser.add_argument("--config", "-c", help="YAML config file (its `models` section applies)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value, e.g. models.offline=false")
    args = parser.parse_args(argv)
    if args.action == "list":
        for role, presets in PRESETS.items():
            for name, preset in presets.items():
                print(f"{role}/{name:14s} {preset.hub_id or '(offline)':48s} {preset.description}")
        return
    if not args.model or "/" not in args.model:
        parser.error("name the model as ROLE/NAME, e.g. note_writer/qwen2.5-7b")
    role, name = args.model.split("/", 1)
    try:
        models = load_config(args.config, args.overrides).models
    except Exception as exc:
        parser.error(str(exc))
    print(resolve_model(role, name, models) if args.action == "pull" else push_to_store(role, name, models))


if __name__ == "__main__":
    main(sys.argv[1:])
