"""What the programs share: one-line errors with exit status 2 on anything the user can fix."""

import argparse
import os
import re
import sys
import tempfile

from .errors import BadInput


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line gives one line on stderr (not usage + error) and status 2."""

    def error(self, message):
        raise BadInput(f"{message} (see --help)")

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but an option of one value given twice is refused, as gqe's programs do
        (argparse keeps the last)."""
        args = sys.argv[1:] if args is None else list(args)
        given = {}
        for a in args:
            if a == "--":
                break
            action = self._option_string_actions.get(a.split("=", 1)[0] if a.startswith("--") else a)
            if isinstance(action, argparse._StoreAction) and action.nargs is None:
                given[action] = given.get(action, 0) + 1
        for action, times in given.items():
            if times > 1:
                self.error(f"{action.option_strings[-1]}: given {times} times; expected once")
        return super().parse_args(args, namespace)


def _decimal(text):
    """A plain decimal integer, as gqe's programs read them: no spaces, underscores or other digits."""
    if not re.fullmatch(r"-?[0-9]+", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a decimal integer")
    return int(text)


def positive_int(text):
    v = _decimal(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} is not a positive integer")
    return v


def non_negative_int(text):
    v = _decimal(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{v} is negative")
    return v


def int_in(low, high):
    """An argparse type: a decimal integer in [low, high] (gqe-train's ranges)."""
    def parse(text):
        v = _decimal(text)
        if not low <= v <= high:
            raise argparse.ArgumentTypeError(f"{v} is out of range; expected {low} to {high}")
        return v
    return parse


def require_creatable(path, what):
    """Refuses, up front, a path that cannot be made: the nearest existing folder on its way must be
    a folder this process can write in (a file there, or no permission, is found here, not after the
    work)."""
    if not path:
        raise BadInput(f"{what} is empty; expected a path")
    ancestor = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise BadInput(f"{what} {path} cannot be made: {ancestor} is not a writable folder")
    try:  # made and removed at once: permissions alone do not tell (root passes them; /proc refuses all)
        os.rmdir(tempfile.mkdtemp(prefix=".gqe-probe-", dir=ancestor))
    except OSError as e:
        raise BadInput(f"{what} {path} cannot be made: {ancestor} is not a writable folder ({e.strerror})") from None


def _out_of_memory(e):
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and (
        "out of memory" in str(e) or "not enough memory" in str(e) or "DefaultCPUAllocator" in str(e)))


def run(prog, main, argv=None):
    """Runs main(argv); BadInput and running out of memory become one line on stderr and exit status 2."""
    try:
        return main(sys.argv[1:] if argv is None else argv) or 0
    except BadInput as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:
        if not _out_of_memory(e):
            raise
        print(f"{prog}: error: out of memory ({str(e).splitlines()[0] if str(e) else 'MemoryError'}); "
              "expected smaller sizes", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
