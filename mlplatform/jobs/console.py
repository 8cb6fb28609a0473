"""What a person sees on the console: the one place that sets it (the CLI calls ``configure``).

    undo = configure(verbose=False)    # before anything imports ray
    quiet_ray()                        # when a command is about to use Ray

The library only logs (``mlplatform.*`` loggers); this module decides what is shown:

- **Step lines.** ``mlplatform.jobs`` (the step runner: one summary line per step) and the
  workloads' own loggers at INFO, as plain lines without timestamps.
- **Warnings and errors** from anything, always, prefixed with their level.
- **Details**: INFO from the library's parts (``mlplatform.features``, ``mlplatform.training``,
  …) and from Ray, Ray Data, Ray Train and Ray Serve only with ``verbose``. Ray is quietened
  where Ray reads its settings: ``RAY_LOGGER_LEVEL`` (the ``ray`` logger of the driver, read
  when ``ray`` is imported), ``RAY_LOG_TO_DRIVER`` (workers' stdout and stderr streamed to the
  driver), the ``ray.train``, ``ray.tune`` and ``ray.serve`` loggers by level, and Ray Data's
  console handler (its progress lines and execution plans are INFO on ``ray.data``). Variables a user
  set are left alone.
- **Progress.** When stderr is a terminal, the step that is running shows a tqdm bar (its
  name and elapsed time) above which the summary lines scroll, and Ray Data draws its own
  bars; otherwise no bar at all (``TQDM_DISABLE=1``), only the summary line per step.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import warnings
from collections.abc import Callable
from typing import Any

__all__ = ["configure", "quiet_ray"]

_SHOWN_AT_INFO = ("mlplatform.jobs", "workloads")
_RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve")
# What Ray reads from the environment (a value the user set is kept): the driver's "ray"
# logger level (read when ray is imported) and whether workers' output streams to the driver.
# Ray Data's own progress bars are off too unless verbose: on a terminal they drew a block of
# operator bars per dataset (hundreds of lines for the main job); the step's bar shows progress.
_RAY_ENV = {"RAY_LOGGER_LEVEL": "warning", "RAY_LOG_TO_DRIVER": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
_state: dict[str, bool] = {}  # what configure() was told, for quiet_ray()


def configure(verbose: bool = False, stream: Any = None) -> Callable[[], None]:
    """Install the console handler on the root logger and quieten Ray unless ``verbose``.

    Call it before ``ray`` is imported (Ray reads ``RAY_LOGGER_LEVEL`` at import). Returns a
    function that undoes it (removes the handler, restores the environment), for callers
    that run more than one command in a process (tests)."""
    stream = stream or sys.stderr
    tty = bool(getattr(stream, "isatty", lambda: False)())
    saved_env = {name: os.environ.get(name) for name in [*_RAY_ENV, "TQDM_DISABLE"]}
    if not verbose:
        for name, value in _RAY_ENV.items():
            os.environ.setdefault(name, value)
    if not tty:
        # tqdm (>= 4.66) reads its defaults from TQDM_* variables: the bars Ray Data draws
        # for small jobs (e.g. "Parquet dataset sampling") would be carriage-return garbage
        # in a log file, so they are off where nobody watches them redraw
        os.environ.setdefault("TQDM_DISABLE", "1")
    _state["verbose"] = verbose
    root = logging.getLogger()
    handler = _ConsoleHandler(stream, verbose=verbose)
    root.addHandler(handler)
    saved_levels = {
        name: logging.getLogger(name or None).level for name in ("", "mlplatform", "mlplatform.jobs", "workloads")
    }
    root.setLevel(min(root.level or logging.WARNING, logging.INFO))
    logging.getLogger("mlplatform").setLevel(logging.DEBUG if verbose else logging.INFO)
    # the runner's "step started" records are DEBUG: they must reach the handler, which
    # turns them into the progress bar on a terminal and shows them as lines only if verbose
    logging.getLogger("mlplatform.jobs").setLevel(logging.DEBUG)
    logging.getLogger("workloads").setLevel(logging.DEBUG if verbose else logging.INFO)
    previous_showwarning = warnings.showwarning
    warnings.showwarning = _show_warning

    def undo() -> None:
        _state.pop("verbose", None)
        logging.getLogger("ray.serve").removeFilter(_warnings_only)
        warnings.showwarning = previous_showwarning
        root.removeHandler(handler)
        handler.close()
        for name, level in saved_levels.items():
            logging.getLogger(name or None).setLevel(level)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    return undo


def quiet_ray() -> None:
    """Ray's own loggers at WARNING on the console, unless ``configure`` was told ``verbose``.

    Ray Data keeps its file log (DEBUG) and its progress bars on a terminal; its INFO lines
    (plans, progress when not on a terminal) go to that file only. Ray Serve sets its
    driver logger back to INFO whenever ``ray.serve`` is imported, so that logger gets a
    filter (which survives the reconfiguration) instead of a level."""
    if _state.get("verbose", True):
        return
    import ray.data  # noqa: F401 - configures the ray.data loggers on import

    for name in _RAY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            if "File" not in type(handler).__name__:
                handler.setLevel(max(handler.level, logging.WARNING))
        if name != "ray.data":
            logger.setLevel(max(logger.level, logging.WARNING))
    serve = logging.getLogger("ray.serve")
    if _warnings_only not in serve.filters:
        serve.addFilter(_warnings_only)


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, *args: Any) -> None:
    """Python warnings as one console line each (``warning: Category: text (file.py:12)``)."""
    text = " ".join(str(message).split())
    logging.getLogger("py.warnings").warning("%s: %s (%s:%d)", category.__name__, text, os.path.basename(filename), lineno)


def _warnings_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


class _ConsoleHandler(logging.Handler):
    """Plain lines for people; a tqdm bar for the running step when the stream is a terminal."""

    def __init__(self, stream: Any, *, verbose: bool) -> None:
        super().__init__(logging.DEBUG)
        self.stream = stream
        self.verbose = verbose
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self._bar: Any = None
        self._ticker: threading.Event | None = None

    def shows(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        if record.levelno < logging.INFO:
            return self.verbose and record.name.startswith(("mlplatform", "workloads"))
        return self.verbose or record.name.startswith(_SHOWN_AT_INFO)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            event = getattr(record, "mlp_step", None)
            if event == "start" and self.tty:
                self._start_bar(getattr(record, "mlp_label", ""))
                return
            if not self.shows(record):
                return
            text = record.getMessage()
            if record.levelno >= logging.WARNING:
                text = f"{record.levelname.lower()}: {text}"
                if record.exc_info and self.verbose:
                    text += "\n" + logging.Formatter().formatException(record.exc_info)
            if event == "done":
                self._stop_bar()
            self._write(text)
        except Exception:  # a console problem must never fail the job
            self.handleError(record)

    def _write(self, text: str) -> None:
        if self._bar is not None:
            from tqdm import tqdm

            tqdm.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def _start_bar(self, label: str) -> None:
        from tqdm import tqdm

        self._stop_bar()
        self._bar = tqdm(total=None, desc=f"[{label}]", bar_format="{desc} {elapsed}", file=self.stream, leave=False)
        stop = self._ticker = threading.Event()
        bar = self._bar

        def tick() -> None:  # tqdm redraws only on update; keep the elapsed time moving
            while not stop.wait(1.0):
                bar.refresh()

        threading.Thread(target=tick, name="mlp-progress", daemon=True).start()

    def _stop_bar(self) -> None:
        if self._ticker is not None:
            self._ticker.set()
            self._ticker = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        self._stop_bar()
        super().close()
