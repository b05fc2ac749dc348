"""What the programs share: one-line errors with exit status 2 on anything the user can fix."""

import argparse
import sys

from .errors import BadInput


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line gives one line on stderr (not usage + error) and status 2."""

    def error(self, message):
        raise BadInput(f"{message} (see --help)")


def positive_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} is not a positive integer")
    return v


def non_negative_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{v} is negative")
    return v


def run(prog, main, argv=None):
    """Runs main(argv) and turns BadInput into one line on stderr and exit status 2."""
    try:
        return main(sys.argv[1:] if argv is None else argv) or 0
    except BadInput as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
