"""The command-line conventions every `mirage-*` command shares, so that commands need not import each other.

Exit codes: 0 done; 1 a usage error or a failure the user must fix (no model, an output that cannot be resumed);
commands give 2 and up their own outcomes (mirage-detect: unreadable files; mirage-adapt: refused by its guard).
A failure is one line on stderr, "<command>: <what to do>", never a traceback. `-q/--quiet` hides progress.
"""

import argparse
import contextlib
import sys

USAGE_ERROR = 1  # argparse's own 2 is taken by the commands' outcomes


class UsageParser(argparse.ArgumentParser):
    def error(self, message):
        """A usage error: the usage and "<command>: error: <message>" on stderr, exit code `USAGE_ERROR`."""
        self.print_usage(sys.stderr)
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message}\n")


def add_quiet(parser: argparse.ArgumentParser, hides: str) -> None:
    """The `-q/--quiet` option; `hides` says what it hides ("progress bar")."""
    parser.add_argument("-q", "--quiet", action="store_true", help=f"no {hides}")


@contextlib.contextmanager
def one_line_errors(prog: str, *errors: type[Exception]):
    """Turns `errors` raised inside into exit code 1 with the one line "<prog>: <error>" (a set-up problem or a
    usage error that argparse cannot see, not a bug: no traceback)."""
    try:
        yield
    except errors as error:
        raise SystemExit(f"{prog}: {error}") from None


def at_least(convert, bound, inclusive: bool = True):
    """An argparse type: `convert(text)`, refused unless it is >= `bound` (> `bound` when not `inclusive`)."""
    relation = ">=" if inclusive else ">"

    def check(text: str):
        value = convert(text)
        if not (value >= bound if inclusive else value > bound):  # written so that NaN is refused too
            raise argparse.ArgumentTypeError(f"must be {relation} {bound}, got {text}")
        return value

    return check


positive_int = at_least(int, 1)
non_negative_int = at_least(int, 0)
positive_float = at_least(float, 0, inclusive=False)
non_negative_float = at_least(float, 0)
