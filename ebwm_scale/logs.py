"""Log lines that say when and where: `2026-11-30 10:41:07 rank 3: step 10/100 | loss ...`.

Rank 0 logs everything; the other ranks only warnings and errors, unless `train.log_all_ranks=true`. Python warnings
(e.g. a tracking server that stopped answering) go through the same lines.
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("ebwm_scale")
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


class _CurrentStdoutHandler(logging.StreamHandler):
    """Writes to sys.stdout as it is at each line, so that lines land above a live progress bar (which replaces
    sys.stdout while it is drawn) and in whatever a test or launcher captures."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value) -> None:
        pass


class _Formatter(logging.Formatter):
    def __init__(self, rank: int):
        super().__init__(f"%(asctime)s rank {rank}: %(message)s", TIME_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        if record.levelno >= logging.WARNING:  # INFO is the plain case; anything louder says so
            record.message = f"{record.levelname}: {record.message}"
        return super().formatMessage(record)


def setup_logging(rank: int, all_ranks: bool = False) -> None:
    """Route the library's and Python's warnings through one `time rank N: message` handler; safe to call again."""
    handler = _CurrentStdoutHandler()
    handler.setFormatter(_Formatter(rank))
    for logger in (log, logging.getLogger("py.warnings")):
        for old in [h for h in logger.handlers if isinstance(h, _CurrentStdoutHandler)]:
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.propagate = False
    log.setLevel(logging.INFO if rank == 0 or all_ranks else logging.WARNING)
    logging.captureWarnings(True)
