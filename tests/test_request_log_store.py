"""The request-log store, on both databases, on its own clock (no sleeping): each account's entries
expire after its own `retention_days`, by the sweep and by the account's next write; the entry cap
drops the oldest; settings are per account and shared by every server on the database; a server's
settings cache is read again after `settings_ttl_s`."""

import asyncio

from loraplex.api.request_log import RequestLogs
from loraplex.config import RequestLogConfig
from loraplex.training.logs import DAY_S, LogQuery, LogRecord, SqlLogStore

NOW = 1_800_000_000.0


def record(account: str, at: float, text: str) -> LogRecord:
    return LogRecord(account, at, "m", None, "openai-chat", [{"role": "user", "content": text}], None, "ok",
                     3, 1, 5, "stop")


def texts(store, account) -> list[str]:
    return [e.record.messages[0]["content"] for e in store.list(account, LogQuery())]


def test_retention_per_account_by_sweep_and_by_write(open_training):
    clock = [NOW]
    store = SqlLogStore(open_training(), RequestLogConfig(max_entries_per_account=3), clock=lambda: clock[0])
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
    assert store.list("long", LogQuery(), offset=1, limit=1)[0].record.messages[0]["content"] == "more 2"
    assert store.count("long", LogQuery(finetunes=())) == 0


def test_settings_changed_through_one_server_reach_another_within_the_ttl(open_training):
    """Two servers' stores on one database, each with its cache (RequestLogs) of a 5 s TTL on an
    injected clock: B keeps its cached answer for less than the TTL, then reads A's change."""
    config = RequestLogConfig(settings_ttl_s=5.0)
    store_a, store_b = SqlLogStore(open_training(), config), SqlLogStore(open_training(), config)
    t = [100.0]
    a = RequestLogs(store_a, writer=None, clock=lambda: t[0])
    b = RequestLogs(store_b, writer=None, clock=lambda: t[0])
    assert asyncio.run(b.settings("acct")).enabled is False  # B reads and caches the default
    assert asyncio.run(a.put_settings("acct", True, None)).enabled is True
    assert asyncio.run(a.settings("acct")).enabled is True  # A's own change: at once
    t[0] += 4.9
    assert asyncio.run(b.settings("acct")).enabled is False  # B: its cached answer, inside the TTL
    t[0] += 0.1
    assert asyncio.run(b.settings("acct")).enabled is True  # TTL over: B reads A's change
    # a change of another field through B keeps A's
    assert asyncio.run(b.put_settings("acct", None, 7)) == store_a.settings("acct")
    assert (store_a.settings("acct").enabled, store_a.settings("acct").retention_days) == (True, 7)


def test_a_zero_ttl_reads_every_time(open_training):
    store = SqlLogStore(open_training(), RequestLogConfig(settings_ttl_s=0))
    logs = RequestLogs(store, writer=None, clock=lambda: 0.0)
    assert asyncio.run(logs.settings("acct")).enabled is False
    store.put_settings("acct", enabled=True)
    assert asyncio.run(logs.settings("acct")).enabled is True
