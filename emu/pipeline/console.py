"""What `emu run` shows while kfp.local runs the pipeline, and where everything else goes.

kfp.local prints, per task, its executor input as JSON, every line the task writes, its outputs
and a warning, to this process's stdout and stderr: about 1,300 lines for the tiny preset, with
Great Expectations and DeepSpeed chatter among them. `RunConsole` points file descriptors 1 and 2
at a pipe for the run. A reader thread writes every line, ANSI escape codes removed, to the run's
log file (which the dashboard's console panel shows), and turns the lines that matter into a
short console: one line when a stage starts, one when it ends (or is served from the cache), and
a few progress lines per training stage (step, losses, ETA) from the trainers' reports. With
`verbose`, every line also goes to the terminal as before.

The lines recognised are kfp.local's (`Executing task 'stage1'`, `Task 'stage1' finished with
status SUCCESS`, `Task stage1 cache hit (key=...)`, as kfp 2.17 logs them) and
emu.train.metrics.MetricsLog's progress line (`stage1 step 60/600 loss 1.64 ...; 70 s elapsed,
ETA 631 s`). A line that matches none of them only goes to the log.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

#: ECMA-48 control sequences (colours, cursor movement): kfp.local colours task names and states.
ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")
STARTED = re.compile(r"Executing task '([^']+)'")
FINISHED = re.compile(r"Task '([^']+)' finished with status (\w+)")
CACHE_HIT = re.compile(r"Task (\S+) cache hit \(key=([0-9a-f]+)\)")
PROGRESS = re.compile(r"(\S+) step (\d+)/(\d+) (.*?); (\d+) s elapsed, ETA (\d+) s\s*$")
#: Progress lines per training stage when the terminal is not a terminal (a CI log, a pipe): at a
#: third and two thirds of the steps. On a terminal one line is rewritten in place instead.
PROGRESS_MARKS = (1 / 3, 2 / 3)
#: Seconds the reader may take to drain the pipe after the run (a process that outlived its task
#: and still holds the pipe must not keep `emu run` from ending).
DRAIN_TIMEOUT_S = 5.0
#: Marks the runner's own lines (`echo`) and this process's log records in the pipe. They travel
#: through the pipe like everything else, so they reach the terminal in the order they were
#: written: the summary after the last stage's end, never before it.
OWN_LINE = "\x1eemu-console\x1e"


def strip_ansi(text: str) -> str:
    return ANSI.sub("", text)


def duration_text(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes} min {seconds:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


class RunConsole:
    """Use as a context manager around the pipeline run; `echo` prints a line of the runner's own.

    `log_path`: the run's log file (appended to). `verbose`: every line to the terminal too.
    `on_cache_hit(task, key)`: called from the reader thread when kfp.local serves a task from its
    cache, so the run's lineage shows the stage as cached while the run is still going.
    `terminal`: where the short console goes (default: this process's stdout as it was on entry).
    When that is the log file itself (`emu run` started in the background with its output sent to
    the run's log), lines are written once.
    """

    def __init__(self, log_path: Path, *, verbose: bool = False,
                 on_cache_hit: Callable[[str, str], None] | None = None, terminal: IO[str] | None = None):
        self.log_path = Path(log_path)
        self.verbose = verbose
        self.on_cache_hit = on_cache_hit
        self.status: dict[str, str] = {}   # task -> SUCCESS | FAILURE, as kfp.local reports it
        self.cached: dict[str, str] = {}   # task -> cache key prefix
        self._terminal = terminal
        # Re-entrant: a cache-hit callback that logs comes back through the console's log handler.
        self._lock = threading.RLock()
        self._echoed = threading.Condition()
        self._sent = self._done = 0          # echo lines sent through the pipe / shown
        self._started: dict[str, float] = {}
        self._progress: dict[str, str] = {}  # task -> its last progress report
        self._marks: dict[str, int] = {}     # task -> PROGRESS_MARKS passed
        self._running: str | None = None
        self._live = False                   # a progress line is shown in place on the terminal
        self._saved_fds: tuple[int, int] | None = None
        self._reader: threading.Thread | None = None
        self._handler: logging.Handler | None = None

    # ------------------------------------------------------------------ context

    def __enter__(self) -> RunConsole:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "a", encoding="utf-8", errors="replace")
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        saved = (os.dup(1), os.dup(2))
        self._saved_fds = saved
        if self._terminal is None:
            self._terminal = os.fdopen(os.dup(saved[0]), "w", encoding="utf-8", errors="replace", buffering=1)
            self._own_terminal = True
        else:
            self._own_terminal = False
        self._same_file = _same_file(self._terminal, self.log_path)
        self._tty = not self._same_file and _isatty(self._terminal)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 1)
        os.dup2(write_end, 2)
        os.close(write_end)
        # Python-level writers on the redirected descriptors, line-buffered (a pipe would make
        # them block-buffered: kfp.local's prints would arrive in 8 KiB bursts), and in place of
        # whatever sys.stdout was (pytest's capture, a notebook's) so every print is captured.
        self._streams = (sys.stdout, sys.stderr)
        sys.stdout = open(1, "w", encoding="utf-8", errors="replace", buffering=1, closefd=False)
        sys.stderr = open(2, "w", encoding="utf-8", errors="replace", buffering=1, closefd=False)
        # Log records go through the console directly, formatted as the `emu` command formats
        # them; kfp.local reports cache hits at INFO, so the root logger must pass INFO.
        root = logging.getLogger()
        self._root_state = (root.level, root.handlers[:])
        self._handler = _LineHandler(self._own)
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.handlers = [self._handler]
        if root.level > logging.INFO:
            root.setLevel(logging.INFO)
        self._reader = threading.Thread(target=self._read, args=(read_end,), daemon=True, name="emu-run-console")
        self._reader.start()
        return self

    def __exit__(self, *exc: object) -> None:
        root = logging.getLogger()
        root.setLevel(self._root_state[0])
        root.handlers = self._root_state[1]
        for stream in (sys.stdout, sys.stderr):
            stream.close()  # flushes; closefd=False leaves the descriptor to the dup2 below
        sys.stdout, sys.stderr = self._streams
        assert self._saved_fds is not None
        os.dup2(self._saved_fds[0], 1)   # the pipe's last write ends close: the reader sees EOF
        os.dup2(self._saved_fds[1], 2)
        for fd in self._saved_fds:
            os.close(fd)
        if self._reader is not None:
            self._reader.join(DRAIN_TIMEOUT_S)
        with self._lock:
            self._end_live()
            self._log.close()
            if self._own_terminal:
                self._terminal.close()

    # ------------------------------------------------------------------ output

    def echo(self, line: str) -> None:
        """A line of the runner's own (the run's header, its summary): terminal and log, after
        everything written before it; returns once it is shown."""
        self._send("echo", line)

    def sync(self) -> None:
        """Return once every line written so far has been read: the events in them (a cache hit
        logged as the pipeline's last act) are recorded before the caller reads the outcome."""
        self._send("sync", "")

    def _send(self, kind: str, line: str) -> None:
        with self._echoed:
            self._sent += 1
            ticket = self._sent
        self._own(line, kind)
        with self._echoed:
            self._echoed.wait_for(lambda: self._done >= ticket, timeout=DRAIN_TIMEOUT_S)

    def _own(self, line: str, kind: str = "log") -> None:
        """Send a line of this process through the pipe: an `echo` line for the terminal, a
        `sync` marker, or a `log` record (captured like any task's output)."""
        if threading.current_thread() is self._reader:  # the reader must never wait on its own pipe
            self._take(line, kind)
            return
        parts = line.split("\n") if kind != "sync" else [""]
        data = "".join(f"{OWN_LINE}{kind}{OWN_LINE}{part}\n" for part in parts)
        os.write(1, data.encode("utf-8", errors="replace"))

    def _take(self, line: str, kind: str) -> None:
        if kind == "log":
            self._line(line)
            return
        if kind == "echo":
            with self._lock:
                self._write_log(line)
                self._show(line)
        with self._echoed:
            self._done += 1
            self._echoed.notify_all()

    def _show(self, line: str) -> None:
        if self._same_file:
            return
        self._end_live()
        self._terminal.write(line + "\n")
        self._terminal.flush()

    def _show_live(self, line: str) -> None:
        self._terminal.write("\r\x1b[K" + line)
        self._terminal.flush()
        self._live = True

    def _end_live(self) -> None:
        if self._live:
            self._terminal.write("\r\x1b[K")
            self._live = False

    def _write_log(self, line: str) -> None:
        self._log.write(strip_ansi(line) + "\n")
        self._log.flush()

    # ------------------------------------------------------------------ reading

    def _read(self, fd: int) -> None:
        with os.fdopen(fd, "rb") as pipe:
            for raw in pipe:
                line = raw.decode("utf-8", errors="replace").rstrip("\n")
                if line.startswith(OWN_LINE):
                    kind, _, text = line[len(OWN_LINE):].partition(OWN_LINE)
                    self._take(text, kind)
                else:
                    self._line(line)

    def _line(self, line: str) -> None:
        """Every captured line: to the log (and the terminal with verbose); the events among them
        become console lines."""
        text = strip_ansi(line).split("\r")[-1]
        with self._lock:
            self._write_log(text)
            if self.verbose and not self._same_file:
                self._end_live()
                self._terminal.write(line + "\n")
                self._terminal.flush()
            summary = self._event(text)
            if summary is None or self.verbose:
                return
            if summary.startswith("\r") and self._tty:
                self._show_live(summary[1:])
            else:
                self._show(summary.lstrip("\r"))

    def _event(self, text: str) -> str | None:
        """The console line for a captured line, or None; a leading "\\r" marks a progress line."""
        now = time.strftime("%H:%M:%S")
        if match := STARTED.search(text):
            task = match.group(1)
            self._started[task] = time.monotonic()
            self._running = task
            return f"{now}  {task:<11} started"
        if match := FINISHED.search(text):
            task, state = match.groups()
            self.status[task] = state
            took = duration_text(time.monotonic() - self._started.get(task, time.monotonic()))
            last = self._progress.get(task)
            detail = f" ({last})" if last else ""
            if state == "SUCCESS":
                return f"{now}  {task:<11} succeeded in {took}{detail}"
            return f"{now}  {task:<11} FAILED after {took}; its output is in {self.log_path}"
        if match := CACHE_HIT.search(text):
            task, key = match.groups()
            if task in self.cached:
                return None
            self.cached[task] = key
            self.status[task] = "SUCCESS"
            if self.on_cache_hit is not None:
                try:
                    self.on_cache_hit(task, key)
                except Exception as exc:  # the run goes on; the summary says what is missing
                    self._write_log(f"could not record the cached {task} in the lineage store: {exc}")
            return f"{now}  {task:<11} cached (reused, not run again)"
        if (match := PROGRESS.search(text)) and self._running is not None:
            _, step, total, losses, _, eta = match.groups()
            report = f"step {step}/{total} {losses}".strip()
            self._progress[self._running] = report
            line = f"{now}  {self._running:<11} {report}, ETA {duration_text(int(eta))}"
            if self._tty:
                return "\r" + line
            passed = sum(int(step) >= mark * int(total) for mark in PROGRESS_MARKS)
            if int(step) < int(total) and passed > self._marks.get(self._running, 0):
                self._marks[self._running] = passed
                return "\r" + line
        return None


class _LineHandler(logging.Handler):
    """Feeds formatted log records of this process to the console, a line at a time."""

    def __init__(self, sink: Callable[[str], None]):
        super().__init__(logging.NOTSET)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        try:
            for line in self.format(record).splitlines() or [""]:
                self.sink(line)
        except Exception:  # logging must never break the run
            self.handleError(record)


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _same_file(stream: IO[str], path: Path) -> bool:
    try:
        return path.exists() and os.path.samestat(os.fstat(stream.fileno()), os.stat(path))
    except (AttributeError, OSError, ValueError):  # a stream without a file descriptor (tests)
        return False
