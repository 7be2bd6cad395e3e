"""Logging set-up: Twisted's logger, plain text on stderr.

Log lines name facilities, control ids, states and timings, never PHI
(names, birth dates, patient identifiers, message text).
"""
from __future__ import annotations

import sys

from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)


def start_logging(level: str = "info") -> None:
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level.lower()))
    observer = FilteringLogObserver(textFileLogObserver(sys.stderr), [predicate])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
