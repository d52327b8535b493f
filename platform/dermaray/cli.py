"""`dermaray models ...`, `dermaray check-cluster ...`: the library's commands (no Ray, no repository needed).

Stages run from the repository, `python -m jobs <stage> ...` (or `python -m jobs.<stage>`, as under
`ray job submit`); they read their config with `config_from_argv` below.
"""

from __future__ import annotations

import argparse
import logging
import sys

from dermaray.config import DermarayConfig, dump_config, load_config

USAGE = """usage: dermaray models list | pull ROLE/NAME | push ROLE/NAME [--config FILE] [key=value ...]
       dermaray check-cluster --config configs/cluster.yaml --cluster cluster.yaml [--serve serve/config.yaml]

Stages run from the repository root: python -m jobs <stage> [--config FILE] [key=value ...]"""


def config_from_argv(argv: list[str], prog: str = "python -m jobs") -> DermarayConfig:
    parser = argparse.ArgumentParser(prog=prog, description="Run with a YAML config and key=value overrides.")
    parser.add_argument("--config", "-c", help="YAML config file (see configs/)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="dotted key=value, e.g. synth.n_lesions=500")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except Exception as exc:  # pydantic / YAML / key errors: one clear line, no traceback
        parser.error(str(exc))
    if args.print_config:
        print(dump_config(cfg))
        sys.exit(0)
    return cfg


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "models":  # model cache and store
        from dermaray.models.cli import main as models_main

        return models_main(argv[1:])
    if argv and argv[0] == "check-cluster":  # the config against cluster.yaml, before anything is submitted
        from dermaray.cluster_check import main as check_main

        sys.exit(check_main(argv[1:]))
    help_asked = bool(argv) and argv[0] in ("-h", "--help")
    if argv and not help_asked:
        print(f"dermaray: unknown command {argv[0]!r}", file=sys.stderr)
    print(USAGE)
    sys.exit(0 if help_asked else 2)


if __name__ == "__main__":
    main()
