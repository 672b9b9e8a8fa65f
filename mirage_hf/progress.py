"""What a run shows as it goes. Progress bars: tqdm's on a terminal; where stderr is a file or a pipe (a log, CI,
`2> run.log`), plain lines now and then instead of carriage-return redraws that a log shows as one endless line.
Messages: one logger, on the main process only."""

import logging
import re
import sys

import datasets
from accelerate.logging import MultiProcessAdapter
from accelerate.state import PartialState
from tqdm import std
from tqdm.auto import tqdm
from tqdm.autonotebook import tqdm as display_tqdm  # already imported by tqdm.auto: the notebook's, or std's
from transformers.utils import logging as hf_logging

IN_NOTEBOOK = display_tqdm is not std.tqdm

PLAIN_LINE_SECONDS = 30.0  # at most one line per bar this often, besides its last
CONTROL = re.compile(r"\x1b\[[0-9;]*[A-Za-z]|\r")  # cursor moves (nested bars) and redraws


class PlainLines:
    """A stream for tqdm that writes each redraw of a bar as a whole line, without control characters."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        for line in CONTROL.sub("\n", text).splitlines():
            if line.strip():
                self.stream.write(line.rstrip() + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(*args, **kwargs) -> tqdm:
    """`tqdm(*args, **kwargs)`, writing plain lines every `PLAIN_LINE_SECONDS` where stderr is not a terminal, and
    a last line when it closes, even for a bar a terminal clears (`leave=False`) (a notebook keeps its widget)."""
    stream = kwargs.get("file") or sys.stderr
    if not IN_NOTEBOOK and not stream.isatty():
        kwargs.update(file=PlainLines(stream), mininterval=PLAIN_LINE_SECONDS, ascii=True, leave=True)
    return tqdm(*args, **kwargs)


def hide_library_bars() -> None:
    """Hides the bars a user cannot act on: transformers' "Loading weights" and "Writing model shards"; and where
    stderr is not a terminal, datasets' (filtering, mapping), which redraw with carriage returns."""
    hf_logging.disable_progress_bar()
    if not IN_NOTEBOOK and not sys.stderr.isatty():
        datasets.disable_progress_bars()


class RunLogger(MultiProcessAdapter):
    """accelerate's logger (the main process only, unless told otherwise) that names the rank only where there are
    several: "[RANK 0]" in front of every line of a one-process run tells a user nothing."""

    def process(self, msg, kwargs):
        kwargs.setdefault("stacklevel", 2)
        state = PartialState()
        return (f"[RANK {state.process_index}] {msg}" if state.num_processes > 1 else msg), kwargs


logger = RunLogger(logging.getLogger("mirage_hf"), {})


def configure_logging():
    """Progress messages (rank 0 only, through accelerate's logger); the libraries' INFO chatter and their loading
    and saving bars (transformers' "Loading weights", "Writing model shards") stay hidden."""
    hide_library_bars()
    base = logging.getLogger("mirage_hf")
    base.setLevel(logging.INFO)
    if not base.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        base.addHandler(handler)
