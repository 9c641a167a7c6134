"""Logging set-up: one line per event, plain text or JSON.

Per-call fields (method, ids, status, duration) arrive as ``extra`` from
`csi_kit._grpc.errors`; request bodies are only ever logged through
`csi_kit._grpc.redact`, so secrets never reach a handler.

Log lines carry caller-chosen strings (object names, ids, paths, error
messages that quote them), so the text format escapes every control
character in the message and in every field: a name holding a newline cannot
forge a second record, and a NUL or an escape sequence cannot make ``grep``
call the log binary or repaint a terminal.  Field values holding a space, a
quote or ``=`` are quoted (logfmt style), so a value cannot forge a field
either.  A traceback keeps its line structure, but every continuation line is
indented: a line that starts at column 0 always starts a record.  JSON escapes
by itself.

`LogThrottle` keeps a noisy event (e.g. undecodable requests sent in a loop)
to one record per interval per key, with a count of what it held back.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable

__all__ = ["setup_logging", "escape_text", "JsonFormatter", "TextFormatter", "LogThrottle"]

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}

#: C0 controls, DEL, C1 controls, and the Unicode line and paragraph separators
#: (which some viewers break lines at).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
#: Field values that need quoting to stay one token.
_NEEDS_QUOTES = re.compile(r'[\s"=]')


def _escape_char(match: re.Match[str]) -> str:
    ch = match.group()
    named = _NAMED.get(ch)
    if named is not None:
        return named
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_text(value: str) -> str:
    """``value`` with every control character written as an escape
    (``\\n``, ``\\r``, ``\\t``, ``\\xNN``, ``\\uNNNN``); other text unchanged."""
    return _CONTROL.sub(_escape_char, value)


def _field(value: object) -> str:
    text = escape_text(str(value))
    if _NEEDS_QUOTES.search(text):
        return '"' + text.replace('"', '\\"') + '"'
    return text


def _extras(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(_extras(record))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message key=value ...``, one line per record
    (a traceback or stack follows on indented lines)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        # Written out rather than left to logging.Formatter.format, which
        # would append an exc_text cached by another handler's formatter
        # unescaped.
        record.message = record.getMessage()
        record.asctime = self.formatTime(record, self.datefmt)
        line = escape_text(self.formatMessage(record))
        fields = [f"{escape_text(k)}={_field(v)}" for k, v in _extras(record).items() if v not in ("", None)]
        if fields:
            line += " " + " ".join(fields)
        if record.exc_info:
            line += "\n" + _continuation(self.formatException(record.exc_info))
        elif record.exc_text:
            line += "\n" + _continuation(record.exc_text)
        if record.stack_info:
            line += "\n" + _continuation(self.formatStack(record.stack_info))
        return line


def _continuation(text: str) -> str:
    """A traceback's lines, each indented and escaped: line breaks stay (a
    traceback is read line by line), but none can pass for a record's start."""
    return "\n".join("    " + escape_text(line) for line in text.rstrip("\n").split("\n"))


class LogThrottle:
    """At most one record per ``interval`` seconds for each key.

    Records that arrive sooner are held back and counted; the next record
    that is let through says how many were held back.  Keys must come from a
    bounded set (e.g. RPC method names), never from a caller.
    """

    def __init__(
        self, logger: logging.Logger, interval: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def log(
        self, level: int, key: str, msg: str, *args: object, extra: dict[str, object] | None = None
    ) -> bool:
        """Log ``msg % args`` unless ``key`` logged less than ``interval`` ago; True if it did."""
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] = self._held.get(key, 0) + 1
            return False
        self._last[key] = now
        held = self._held.pop(key, 0)
        if held:
            msg += f" ({held} more since the last report were not logged)"
        self.logger.log(level, msg, *args, extra=extra)
        return True


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    """One handler on the root logger, writing ``fmt`` lines to stderr.

    Neither format shows the caller's file and line, thread or process, so
    the records do not gather them (the logging module's documented
    optimisations): a driver writes a line per call, and a record costs
    several microseconds less without them.
    """
    logging._srcfile = None  # no stack walk for the caller's line
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
