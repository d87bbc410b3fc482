"""Logging for every chorus process: plain text, or one JSON object per line for log pipelines."""

from __future__ import annotations

import json
import logging
import os

# Attributes every LogRecord has; anything else was passed with `extra=` and goes into the JSON.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}
FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **{k: v for k, v in vars(record).items() if k not in _STANDARD},
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def default_format() -> str:
    """CHORUS_LOG_FORMAT, so processes a cluster spawns log like their parent."""
    return os.environ.get("CHORUS_LOG_FORMAT", "text")


def configure(level: str = "INFO", fmt: str | None = None) -> None:
    fmt = fmt or default_format()
    if fmt not in FORMATS:
        raise ValueError(f"log format: {fmt!r} is not one of {FORMATS}")
    os.environ["CHORUS_LOG_FORMAT"] = fmt
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
