"""What every command line of the project shares: a mistake is one line and exit 2."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from mnistq.protocol import ExitCode


def one_line_errors(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """A command-line mistake is one line and exit 2, not argparse's usage block."""

    def error(message: str) -> NoReturn:
        sys.stderr.write(f"{p.prog}: error: {message} (see {p.prog} --help)\n")
        sys.exit(ExitCode.CONFIG)

    p.error = error  # type: ignore[method-assign]
    return p
