"""The package's log lines: ``logging`` under the ``zoomvit`` logger, one format, on stdout.

Library code only logs (``logging.getLogger(__name__)``); entry points (the command lines, the
Ray Train worker, the benchmarks) call :func:`configure` once. Lines read ``[stage] message``:
the stage prefix is part of the message.
"""

from __future__ import annotations

import builtins
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

FORMAT = "%(message)s"
VERBOSE_ENV = "ZOOMVIT_VERBOSE"
CHATTY_LOGGERS = ("ray.data", "ray.train", "ray.tune", "DeepSpeed", "deepspeed", "torch.distributed", "mlflow")
HARMLESS_WARNINGS = (
    # DeepSpeed's ZeRO still calls the deprecated collective; nothing for its users to act on
    (r".*all_gather_into_tensor.*is deprecated.*", FutureWarning),
)


@contextmanager
def dropped_prints(*patterns: str, verbose_: bool = False) -> Iterator[None]:
    """Inside the block, ``print()`` calls whose text matches a pattern print nothing (unless verbose):
    for a library's known-harmless prints, such as DeepSpeed's op-build notice, which Ray Train's
    print patch would otherwise send to the console past any logger level or stdout redirect."""
    if verbose_:
        yield
        return
    original = builtins.print
    compiled = [re.compile(p) for p in patterns]

    def filtered(*objects, **kwargs) -> None:
        if not any(p.search(" ".join(map(str, objects))) for p in compiled):
            original(*objects, **kwargs)

    builtins.print = filtered
    try:
        yield
    finally:
        builtins.print = original


def configure(level: int | str = logging.INFO) -> None:
    """Send the ``zoomvit`` loggers' records at ``level`` and above to stdout; idempotent."""
    logger = logging.getLogger("zoomvit")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(FORMAT))
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def quiet_libraries(*, verbose_: bool | None = None) -> None:
    """Unless verbose: Ray Data's progress bars off (the flag travels with every dataset this process
    builds), Ray/DeepSpeed/MLflow loggers at WARNING, known-harmless warnings silenced. Their full
    output stays in Ray's log files (``/tmp/ray/session_latest/logs``)."""
    if verbose() if verbose_ is None else verbose_:
        return
    from ray.data import DataContext

    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # "View run ... at" per run
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # logging a model downloads its files
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "Progress bars disabled"
    for message, category in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime is found" on CPU
    try:  # Ray 2.60 names this logger by its file, so LoggingConfig's level never reaches "Reporting training result"
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass


def train_log_level() -> str:
    """Ray Train's console level (``RunConfig(logging_config=...)``); its system log files keep everything."""
    return "INFO" if verbose() else "WARNING"
