"""What the tools share on the command line: gqe-run's contract for bad input.

A bad input (a flag, a file, a missing program) is refused with one line on stderr,
`PROG: error: ...`, naming what was wrong and what was expected, and exit status 2. A child program
that fails after the tool has started passes its status on: 2 when it refused its input, 1 for
anything else.
"""
import argparse
import sys


def refuse(prog, message):
    """A bad input: one line, exit status 2."""
    sys.stderr.write(f"{prog}: error: {message}\n")
    sys.exit(2)


def child_failed(prog, message, status):
    """A child program's failure: one line, its own status when that is 1 or 2, else 1."""
    sys.stderr.write(f"{prog}: error: {message}\n")
    sys.exit(status if status in (1, 2) else 1)


class Parser(argparse.ArgumentParser):
    """argparse's parser, its usage errors in one line (argparse's own prints the usage too)."""

    def error(self, message):
        refuse(self.prog, f"{message} (see --help)")
