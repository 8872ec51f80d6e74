"""``audioldm2-trt``: one command line, sub-commands dispatched to the stage that owns them.

export / validate need the `export` extra (torch, diffusers); generate / demo need only the runtime.
Library errors (AudioLDM2Error) become one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from . import __version__
from .runtime.errors import AudioLDM2Error


def _export_commands(sub) -> None:
    from .export import cli as export_cli  # imports nothing heavy until a command runs

    export_cli.add_commands(sub)


def _runtime_commands(sub) -> None:
    from .runtime import cli as runtime_cli

    runtime_cli.add_commands(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="audioldm2-trt", description="AudioLDM 2 exported and accelerated")
    parser.add_argument("--version", action="version", version=f"audioldm2-trt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress of every stage")
    sub = parser.add_subparsers(dest="command", required=True)
    _export_commands(sub)
    _runtime_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args) or 0)
    except AudioLDM2Error as err:
        print(f"audioldm2-trt {args.command}: error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:
        if err.name in ("torch", "diffusers", "transformers", "onnx"):
            print(f"audioldm2-trt {args.command}: error: {err.name} is missing; install the export extra: "
                  "pip install 'audioldm2-trt[export]'", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
