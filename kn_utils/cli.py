"""``python -m kn_utils <command>``: each command lives in ``kn_utils/commands/<name>.py``.

A command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.

A user's mistake is one line on stderr, ``python -m kn_utils <command>: error: ...``, and exit status 2
(argparse's convention), never a traceback: arguments argparse refuses, ``--device`` / ``--dtype``
checked here before anything loads, and what the command raises while it checks its inputs
(:class:`~kn_utils.checks.UsageError`, missing or unreadable files, and any ValueError / TypeError
before it calls :func:`inputs_checked`).  A ValueError after that is a fault of the computation,
not of the input, and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .checks import UsageError

# command name -> module under kn_utils.commands
COMMANDS = {
    "demo": "demo",
    "localise": "localise",
    "trace": "trace",
    "evaluate-edits": "evaluate_edits",
    "reproduce": "reproduce",
}

# errors about the user's files: one line wherever they are raised
_FILE_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError)
_state = {"computing": False}


def inputs_checked() -> None:
    """A command calls this once its inputs are checked and its computation starts: from then on a
    ValueError or TypeError is not the user's mistake and keeps its traceback."""
    _state["computing"] = True


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # argparse prints its usage block first; one line says the same and fits a log
        self.exit(2, f"{self.prog}: error: {message}\n")


def int_at_least(minimum: int, why: str = ""):
    """argparse type: an integer >= ``minimum`` (``why`` is added to the error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            name = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise argparse.ArgumentTypeError(f"must be {name}{why}, got {value}")
        return value
    parse.__name__ = f"int_at_least_{minimum}"
    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)


def fraction(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {text}")
    return value


def check_device(text: str | None) -> None:
    """cpu, cuda or cuda:N (only where CUDA is), mps (only where it is); None: the default."""
    if text is None:
        return
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {text!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {text}: CUDA is not available on this machine (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"--device {text}: MPS is not available on this machine (use --device cpu)")
    elif device.type != "cpu":
        raise UsageError(f"--device {text!r}: kn_utils runs on cpu, cuda, cuda:N or mps")


def check_dtype(text: str | None) -> None:
    """A floating-point torch dtype name (float32, bfloat16, float16 ...) or auto."""
    if text is None or text == "auto":
        return
    import torch

    value = getattr(torch, text, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise UsageError(f"--dtype {text!r} is not a floating-point dtype: use float32, bfloat16, "
                         f"float16 or auto (the checkpoint's own)")


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename and err.strerror:
        text = f"{err.filename}: {err.strerror}"
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


def _load(name):
    return importlib.import_module(f"kn_utils.commands.{COMMANDS[name]}")


def main(argv=None) -> int:
    parser = _Parser(prog="python -m kn_utils", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        module = _load(name)
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        command.add_argument("--model", default="default",
                             help="'default' (embedded SmolLM2-135M), a hub id, a folder or a .gguf file")
        command.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
        module.add_arguments(command)
        command.set_defaults(_module=module, _parser=command)
    args, extra = parser.parse_known_args(argv)
    command = args._parser
    if extra:   # said by the command's parser, so the line names the command
        command.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        check_device(args.device)
        check_dtype(getattr(args, "dtype", None))
    except UsageError as err:
        command.error(str(err))
    from .cache import CacheNotWritable   # an empty read-only KN_UTILS_CACHE: said in one line too

    _state["computing"] = False
    try:
        return int(args._module.run(args) or 0)
    except (UsageError, CacheNotWritable, *_FILE_ERRORS) as err:
        return _fail(command, err)
    except (ValueError, TypeError) as err:
        if _state["computing"]:
            raise
        return _fail(command, err)
    finally:
        _state["computing"] = False


def _fail(command, err) -> int:
    print(f"{command.prog}: error: {_one_line(err)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
