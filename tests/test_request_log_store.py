"""The request-log store's retention on its own clock (no sleeping): each account's entries expire
after its own `retention_days`, by the sweep and by the account's next write; the entry cap
drops the oldest; settings are per account."""

from loraplex.config import RequestLogConfig
from loraplex.training.logs import DAY_S, LogQuery, LogRecord, SqliteLogStore

NOW = 1_800_000_000.0


def record(account: str, at: float, text: str) -> LogRecord:
    return LogRecord(account, at, "m", None, "openai-chat", [{"role": "user", "content": text}], None, "ok",
                     3, 1, 5, "stop")


def texts(store, account) -> list[str]:
    return [e.record.messages[0]["content"] for e in store.list(account, LogQuery())]


def test_retention_per_account_by_sweep_and_by_write(tmp_path):
    clock = [NOW]
    store = SqliteLogStore(tmp_path, RequestLogConfig(max_entries_per_account=3), clock=lambda: clock[0])
    store.put_settings("short", enabled=True, retention_days=1)
    store.put_settings("long", retention_days=10)
    assert store.settings("long").enabled is False and store.settings("nobody").retention_days == 30
    for account in ("short", "long"):
        store.add(record(account, NOW, "old"))
    clock[0] = NOW + 2 * DAY_S
    assert texts(store, "short") == [] and texts(store, "long") == ["old"]  # expired: never shown
    assert store.sweep() == 1 and store.sweep() == 0
    clock[0] = NOW + 11 * DAY_S
    store.add(record("long", clock[0], "new"))  # the write removes the account's expired entries
    assert store.count("long", LogQuery()) == 1 and texts(store, "long") == ["new"]
    for i in range(4):
        store.add(record("long", clock[0] + i, f"more {i}"))
    assert texts(store, "long") == ["more 3", "more 2", "more 1"]  # the cap of 3: oldest dropped
