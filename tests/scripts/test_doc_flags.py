#!/usr/bin/env python3
r"""Every flag that README.md, docs/ and the tests' READMEs pass to a program of the project is one the program takes.

    /usr/bin/python3 tests/scripts/test_doc_flags.py build/examples/gqe-run build/examples/gqe-train \
        build/examples/gqe-demo build/bench/gqe-bench

Commands are read from the documents' code: fenced blocks and `inline` spans, with backslash
continuations joined. A command is a program's name (a path ending in it, or `-m gqe_torch.train`)
and what follows it up to the next `|`, `;`, `&&`, `||` or `)`. The C++ programs' flags are read from
their --help; the Python tools' and gqe_torch's from their argparse calls, so that nothing has to
be imported. A flag with a value after `=` counts by its name.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLAG = re.compile(r"--[A-Za-z][A-Za-z0-9_-]*")
PYTHON_PROGRAMS = {
    "bench_report.py": "tools/bench_report.py",
    "cold_prefill.py": "tools/cold_prefill.py",
    "gqe_reference.py": "tools/gqe_reference.py",
    "gqe_sweep.py": "tools/gqe_sweep.py",
    "make_bad_checkpoints.py": "tools/make_bad_checkpoints.py",
    "make_fixtures.py": "tools/make_fixtures.py",
    "make_large_checkpoint.py": "tools/make_large_checkpoint.py",
    "torch_compare.py": "tools/torch_compare.py",
    "gqe_torch.train": "python/gqe_torch/train.py",
    "gqe_torch.convert": "python/gqe_torch/convert.py",
}

KNOWN: dict[str, set[str]] = {}  # program name -> its flags, filled by main()


def cpp_flags(program: str) -> set[str]:
    out = subprocess.run([program, "--help"], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        sys.exit(f"{program} --help exited with {out.returncode}: {out.stderr.strip()}")
    return set(FLAG.findall(out.stdout + out.stderr))


def argparse_flags(path: str) -> set[str]:
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        source = f.read()
    flags = {"--help"}
    for call in re.finditer(r"add_argument\(((?:\s*\"-[^\"]*\"\s*,?)+)", source):
        flags.update(FLAG.findall(call.group(1)))
    if len(flags) == 1 and "add_argument" in source:
        sys.exit(f"{path}: no flag read from its add_argument calls; this test's pattern needs updating")
    return flags


def code_of(text: str) -> list[str]:
    """The documents' code: fenced blocks (continuations joined) and inline spans, as lines."""
    lines = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M):
        lines.extend(block.replace("\\\n", " ").splitlines())
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
    lines.extend(span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", prose))
    return lines


def commands(line: str):
    """(program, flags) for every known program a line of code runs."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:  # an unbalanced quote in a span that is no command
        words = line.split()
    i = 0
    while i < len(words):
        base = words[i] if i > 0 and words[i - 1] == "-m" else os.path.basename(words[i])
        i += 1
        if base not in KNOWN:
            continue
        flags = []
        # The command's own words: a program named among them (--bench PATH) is a value, not a command.
        while i < len(words) and words[i] not in ("|", ";", "&&", "||", ")") and not words[i].startswith((">", "2>")):
            if words[i].startswith("--"):
                flags.append(words[i].split("=", 1)[0])
            i += 1
        yield base, flags


def main() -> int:
    if len(sys.argv) != 5 or sys.argv[1] in ("-h", "--help"):
        print(__doc__, file=sys.stderr)
        return 0 if len(sys.argv) == 2 and sys.argv[1] in ("-h", "--help") else 2
    for program in sys.argv[1:]:
        KNOWN[os.path.basename(program)] = cpp_flags(program)
    for name, path in PYTHON_PROGRAMS.items():
        KNOWN[name] = argparse_flags(path)
    documents = [os.path.join(ROOT, "README.md")] + sorted(
        glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True) +
        glob.glob(os.path.join(ROOT, "tests", "**", "README.md"), recursive=True))
    failures, checked = [], 0
    for doc in documents:
        with open(doc, encoding="utf-8") as f:
            text = f.read()
        for line in code_of(text):
            for program, flags in commands(line):
                for flag in flags:
                    checked += 1
                    if flag not in KNOWN[program]:
                        failures.append(f"{os.path.relpath(doc, ROOT)}: {program} has no flag {flag} "
                                        f"(in: {line.strip()[:100]})")
    for failure in failures:
        print("FAIL", failure)
    print(f"{checked} flags in {len(documents)} documents checked against {len(KNOWN)} programs, "
          f"{len(failures)} unknown")
    if checked < 100:
        print("FAIL fewer than 100 flags found: the documents' commands were not read")
        return 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
