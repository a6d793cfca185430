"""The server's log lines: one line per record on stderr, as text or as JSON (`--log-format`),
uvicorn's own lines (start-up, access) included.

Structured records carry their fields in `extra={"fields": {...}}` (use `event`). Text lines read
`TIME LEVEL LOGGER: MESSAGE key=value …`; JSON lines are one object each:
`{"ts", "level", "logger", "message", **fields}`, and uvicorn's access lines also get `client`,
`method`, `path` and `status`. Callers never put prompt text, generated text or tokens in fields.
"""

from __future__ import annotations

import json
import logging
import logging.config
from datetime import datetime, timezone

LOG_FORMATS = ("text", "json")


def event(logger: logging.Logger, message: str, level: int = logging.INFO, **fields) -> None:
    """Log one structured line: `message` plus `fields` (JSON-serializable values)."""
    logger.log(level, message, extra={"fields": fields})


def _fields(record: logging.LogRecord) -> dict:
    fields = dict(getattr(record, "fields", None) or {})
    if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
        client, method, path, _, status = record.args
        fields.update(client=client, method=method, path=path, status=status)
    return fields


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = (f"{datetime.fromtimestamp(record.created).isoformat(timespec='seconds')} {record.levelname} "
                f"{record.name}: {record.getMessage()}")
        extra = getattr(record, "fields", None) or {}
        if extra:
            line += " " + " ".join(f"{key}={_text(value)}" for key, value in extra.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _text(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return json.dumps(text) if not text or any(c.isspace() or c in "\"=" for c in text) else text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
               "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        out.update(_fields(record))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def log_config(log_format: str, level: str) -> dict:
    """A `logging.config.dictConfig` for uvicorn's `log_config`: uvicorn's loggers and loraplex's
    all write `log_format` lines to stderr at `level`."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS}, got {log_format!r}")
    level = level.upper()
    formatter = {"()": f"{__name__}.{'Json' if log_format == 'json' else 'Text'}Formatter"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"line": formatter},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "line", "stream": "ext://sys.stderr"}},
        "loggers": {
            "uvicorn": {"handlers": ["stderr"], "level": level, "propagate": False},
            "uvicorn.error": {"level": level},
            "uvicorn.access": {"handlers": ["stderr"], "level": level, "propagate": False},
            "loraplex": {"handlers": ["stderr"], "level": level, "propagate": False},
            "py.warnings": {"handlers": ["stderr"], "level": "WARNING", "propagate": False},
        },
    }


def configure(log_format: str, level: str) -> dict:
    """Route loraplex's, uvicorn's and Python's warnings' lines through `log_config` now (before
    the model loads, so start-up lines are formatted too); returns the config for uvicorn."""
    config = log_config(log_format, level)
    logging.config.dictConfig(config)
    logging.captureWarnings(True)
    return config
