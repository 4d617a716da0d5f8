"""`RecordingLog`: a stand-in for the CLI's log callable (`log(msg)`, `log.warn(msg)`) that keeps
every line, for tests to assert on. Not a test file."""

from __future__ import annotations


class RecordingLog:
    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, msg):
        self.lines.append(msg)

    warn = __call__
