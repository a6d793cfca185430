"""ErrorLog: the ERROR records a live server logs while a test runs (tracebacks of unhandled
exceptions), for tests that must show the server stayed clean."""

from __future__ import annotations

import logging
from contextlib import contextmanager


class ErrorLog(logging.Handler):
    """Collects ERROR records of the server's loggers (tracebacks of unhandled exceptions)."""

    LOGGERS = ("uvicorn.error", "loraplex")

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @contextmanager
    def watching(self):
        for name in self.LOGGERS:
            logging.getLogger(name).addHandler(self)
        try:
            yield self
        finally:
            for name in self.LOGGERS:
                logging.getLogger(name).removeHandler(self)

    def messages(self, but_client_disconnects: bool = False) -> list[str]:
        """One line per record; `but_client_disconnects` leaves out the known issue of a client
        that leaves before its body was read (see test_client_gone_before_its_body_is_no_server_error)."""
        def kind(record: logging.LogRecord) -> str:
            return record.exc_info[0].__name__ if record.exc_info else ""

        return [record.getMessage().strip() + (f" ({kind(record)})" if kind(record) else "")
                for record in self.records if not (but_client_disconnects and kind(record) == "ClientDisconnect")]
