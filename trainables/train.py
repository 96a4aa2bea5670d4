"""One trial alone, without Ray: the debugging and scripting entry of `trainables`.

    python -m trainables.train --config trial.yaml --set lr=3e-4
"""

from __future__ import annotations

import argparse
import json
import sys

import yaml

from trainables.config import parse_overrides, resolve_config
from trainables.errors import UserError
from trainables.training.epochs import train


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Run one medtune trial without Ray.")
    parser.add_argument("--config", help="YAML/JSON file of config keys (see trainables/config.py)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override keys, YAML values")
    parser.add_argument("--data-root", help="folder holding the datasets (default $MEDTUNE_DATA_ROOT)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def read_config_file(path: str) -> dict:
    """A trial config file (YAML or JSON mapping of config keys); unreadable or malformed is one UserError."""
    try:
        with open(path) as handle:
            loaded = yaml.safe_load(handle)
    except (OSError, yaml.YAMLError) as error:
        raise UserError(f"Cannot read config file {path} ({type(error).__name__}: "
                        f"{str(error).splitlines()[0]}); fix the path or the YAML") from error
    if loaded is not None and not isinstance(loaded, dict):
        raise UserError(f"{path}: expected a mapping of config keys (see trainables/config.py)")
    return loaded or {}


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        overrides = read_config_file(args.config) if args.config else {}
        overrides |= parse_overrides(args.set)
        if args.data_root:
            overrides["data_root"] = args.data_root
        config = resolve_config(overrides)
        final = train(config, report=lambda m: print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                                              for k, v in m.items() if not k.startswith("test_")})))
        print("test:", json.dumps({k: round(v, 4) for k, v in final.items() if k.startswith("test_")}))
    except UserError as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
