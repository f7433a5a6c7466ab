"""Progress for the long commands (load-movielens, reembed, eval). On a terminal, a
bar. Into a file or a CI log, where a bar's redraws are noise (carriage
returns and, for nested bars, cursor-movement escape codes), a plain line
every LINE_INTERVAL_S and one at the end; nothing for work done sooner (the
commands were silent there: minutes of MovieLens loading without a word)."""

import sys

from tqdm import tqdm

LINE_INTERVAL_S = 30.0


class _Lines:
    """A stream for tqdm off a terminal: each status it draws, a line of its
    own, without the redraw's control characters or a repeat of the last."""

    def __init__(self, out):
        self._out = out
        self._last = ""

    def write(self, text: str) -> None:
        line = text.replace("\r", "").replace("\x1b[A", "").strip()
        if line and line != self._last:
            self._out.write(line + "\n")
            self._last = line

    def flush(self) -> None:
        self._out.flush()


def progress(*args, **kwargs) -> tqdm:
    """tqdm(*args, **kwargs) to stderr: a bar on a terminal, else lines (see above)."""
    if sys.stderr.isatty():
        return tqdm(*args, **kwargs)
    every = LINE_INTERVAL_S
    return tqdm(*args, file=_Lines(sys.stderr), mininterval=every, maxinterval=every, delay=every, ascii=True,
                **kwargs)
