"""The run's progress on stderr: a tqdm bar on a terminal; elsewhere (a log
file, a pipe, CI) or without tqdm, one plain line per step."""

import os
import sys
import time


def terminal_size(file):
    """The terminal's (columns, lines), 80x24 where it says none: a
    pseudo-terminal without a size reports 0x0, on which tqdm draws nothing."""
    try:
        size = os.get_terminal_size(file.fileno())
    except (AttributeError, OSError, ValueError):
        return 80, 24
    return size.columns or 80, size.lines or 24


class Progress:
    """Progress over `total` steps; at(done, label) before each step (done
    steps so far, what runs now), close() after the last."""

    def __init__(self, total, file=None):
        self.total = total
        self.file = sys.stderr if file is None else file
        self.started = time.perf_counter()
        self.bar = None
        isatty = getattr(self.file, "isatty", None)
        if isatty is not None and isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                # No monitor thread: nothing wakes up while a case is timed.
                tqdm.monitor_interval = 0
                columns, lines = terminal_size(self.file)
                self.bar = tqdm(
                    total=total,
                    file=self.file,
                    bar_format="[{bar:30}] {n_fmt}/{total_fmt} {elapsed} {desc}",
                    ascii=".#",
                    ncols=columns,
                    nrows=lines,
                )

    def at(self, done, label):
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            self.bar.set_description_str(label)
        else:
            elapsed = time.perf_counter() - self.started
            print(f"[{done}/{self.total}] {elapsed:5.0f} s  {label}", file=self.file, flush=True)

    def close(self):
        self.at(self.total, "done")
        if self.bar is not None:
            self.bar.close()
