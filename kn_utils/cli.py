"""``python -m kn_utils <command>``: each command lives in ``kn_utils/commands/<name>.py``.

A command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# command name -> module under kn_utils.commands
COMMANDS = {
    "demo": "demo",
    "localise": "localise",
    "trace": "trace",
    "evaluate-edits": "evaluate_edits",
    "reproduce": "reproduce",
}


def _load(name):
    return importlib.import_module(f"kn_utils.commands.{COMMANDS[name]}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kn_utils", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        module = _load(name)
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        command.add_argument("--model", default="default",
                             help="'default' (embedded SmolLM2-135M), a hub id, a folder or a .gguf file")
        command.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
        module.add_arguments(command)
        command.set_defaults(_module=module)
    args = parser.parse_args(argv)
    return int(args._module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
