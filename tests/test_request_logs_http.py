"""Request logs over HTTP against a live server, with the real clients: settings (round trip, bad
values), the `cf-aig-collect-log` header, each dialect recorded (Cloudflare SDK for Workers AI,
OpenAI SDK for chat and completions), filters and pages, feedback and correction, delete, export
(content, what is left out, nothing to export), another account sees none of it, and the bounds:
entries per account (oldest dropped), bytes per entry (skipped), retention, a full writer queue
and a failing store (dropped and counted; the generation answers as always)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from loraplex.config import RequestLogConfig
from tests.api_server import LiveServer, server_options
from tests.request_log_client import MODEL, OFF, ON, Tenant, refused

BOUNDS = RequestLogConfig(max_entries_per_account=6, max_entry_bytes=400)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    live = LiveServer.start(server_options(model_dir, tmp_path_factory.mktemp("data"), request_logs=BOUNDS))
    yield live
    live.stop()


def dropped(server, reason: str) -> float:
    return server.ctx.metrics.request_logs_dropped.labels(reason)._value.get()


def test_settings_round_trip_and_bad_values(server):
    t = Tenant(server, "logs-settings")
    assert t.ok("GET", "/settings") == {"enabled": False, "retention_days": 30}
    assert t.ok("PUT", "/settings", json={"enabled": True}) == {"enabled": True, "retention_days": 30}
    assert t.ok("PUT", "/settings", json={"retention_days": 7}) == {"enabled": True, "retention_days": 7}
    assert t.ok("GET", "/settings") == {"enabled": True, "retention_days": 7}
    for body, needle in [({"retention_days": 0}, "retention_days must be an integer from 1 to 365"),
                         ({"retention_days": 366}, "retention_days"), ({"retention_days": "7"}, "retention_days"),
                         ({"retention_days": True}, "retention_days"), ({"enabled": "yes"}, "enabled must be"),
                         ([1], "JSON object")]:
        refused(t.call("PUT", "/settings", json=body), 400, needle)
    assert t.ok("GET", "/settings") == {"enabled": True, "retention_days": 7}
    other = Tenant(server, "logs-settings-other")
    assert other.ok("GET", "/settings")["enabled"] is False
    refused(httpx.get(f"{other.base}/logs/settings", headers={"Authorization": f"Bearer {t.token}"}), 403, "forbidden")


def test_each_dialect_is_recorded_and_the_header_overrides_the_setting(server):
    t = Tenant(server, "logs-dialects")
    t.run("not logged: logging is off")
    answer = t.run("logged by the header", ON)
    chat = t.chat("a chat, logged by the header", ON)
    completion = t.oai.completions.create(model=MODEL, prompt="raw text", max_tokens=3, temperature=0,
                                          extra_headers=ON)
    refused(httpx.post(f"{t.base}/run/{MODEL}", json={"prompt": "x"},
                       headers={"Authorization": f"Bearer {t.token}", "cf-aig-collect-log": "maybe"}),
            400, "cf-aig-collect-log header must be true or false")
    t.ok("PUT", "/settings", json={"enabled": True})
    t.chat("not logged: the header says false", OFF)
    stream = t.oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "streamed"}],
                                           max_tokens=4, temperature=0, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    t.chat("logged by the setting")

    entries = t.logs()
    assert [e["messages"][0]["content"] if e["messages"] else e["prompt"] for e in entries] == [
        "logged by the setting", "streamed", "raw text", "a chat, logged by the header", "logged by the header"]
    setting, stream_entry, raw, chat_entry, run_entry = entries
    assert stream_entry["response"] == streamed
    assert [e["dialect"] for e in entries] == ["openai-chat"] * 2 + ["openai-completions", "openai-chat", "workers-ai"]
    assert run_entry["messages"] == [{"role": "user", "content": "logged by the header"}]
    assert run_entry["prompt"] is None and run_entry["response"] == answer
    assert (raw["messages"], raw["response"]) == ([], completion.choices[0].text)
    assert raw["completion_tokens"] == completion.usage.completion_tokens
    assert chat_entry["response"] == chat.choices[0].message.content
    assert (chat_entry["prompt_tokens"], chat_entry["completion_tokens"]) == (chat.usage.prompt_tokens,
                                                                               chat.usage.completion_tokens)
    assert chat_entry["finish_reason"] == chat.choices[0].finish_reason
    for e in entries:
        assert (e["model"], e["finetune"], e["feedback"], e["corrected_response"]) == (MODEL, None, None, None)
        assert e["created_at"].endswith("Z") and e["duration_ms"] >= 0
        assert t.ok("GET", f"/{e['id']}") == e


def test_filters_pages_feedback_correction_delete(server):
    t = Tenant(server, "logs-curate")
    t.ok("PUT", "/settings", json={"enabled": True})
    for word in ("one", "two", "three"):
        t.chat(f"say {word}")
    three, two, one = t.logs()
    assert t.ok("PATCH", f"/{one['id']}", json={"feedback": 1})["feedback"] == 1
    patched = t.ok("PATCH", f"/{two['id']}", json={"feedback": -1, "corrected_response": "TWO"})
    assert (patched["feedback"], patched["corrected_response"], patched["response"]) == (-1, "TWO", two["response"])
    for body, needle in [({"feedback": 2}, "feedback must be 1, -1 or null"), ({"feedback": True}, "feedback"),
                         ({"corrected_response": " "}, "non-empty string"), ({"corrected_response": 5}, "non-empty")]:
        refused(t.call("PATCH", f"/{one['id']}", json=body), 400, needle)

    ids = lambda **params: [e["id"] for e in t.logs(**params)]  # noqa: E731
    assert ids(feedback="1") == [one["id"]] and ids(feedback="-1") == [two["id"]]
    assert ids(feedback="none") == [three["id"]]
    assert ids(since=two["created_at"]) == [three["id"], two["id"]]
    assert ids(until=two["created_at"]) == [two["id"], one["id"]]
    assert ids(finetune="no-such-finetune") == []
    refused(t.call("GET", "", params={"since": "yesterday"}), 400, "since must be ISO 8601 or unix seconds")
    refused(t.call("GET", "", params={"feedback": "0"}), 400, "feedback must be 1, -1 or none")
    refused(t.call("GET", "", params={"per_page": 101}), 400, "per_page must be between 1 and 100")
    for bad in ("inf", "nan", "1e300", "-1"):
        refused(t.call("GET", "", params={"until": bad}), 400, "until must be a time from 1970 to 9999")
    assert t.ok("GET", "", params={"page": 2**80}) == []
    page = t.call("GET", "", params={"page": 2, "per_page": 2}).json()
    assert [e["id"] for e in page["result"]] == [one["id"]]
    assert page["result_info"] == {"page": 2, "per_page": 2, "count": 1, "total_count": 3, "total_pages": 2}

    assert t.ok("PATCH", f"/{two['id']}", json={"corrected_response": None})["corrected_response"] is None
    assert t.ok("DELETE", f"/{three['id']}") == {"id": three["id"]}
    refused(t.call("GET", f"/{three['id']}"), 404, "no log entry")
    assert ids() == [two["id"], one["id"]]


def test_export_writes_the_curated_chats_as_a_fine_tuning_file(server, monkeypatch):
    t = Tenant(server, "logs-export")
    refused(t.call("POST", "/export", json={}), 400, "no log entries to export")
    t.ok("PUT", "/settings", json={"enabled": True})
    for word in ("good", "fixed", "bad", "plain"):
        t.chat(f"answer {word}")
    t.oai.completions.create(model=MODEL, prompt="a raw prompt", max_tokens=3, temperature=0)
    raw, plain, bad, fixed, good = t.logs()
    t.ok("PATCH", f"/{good['id']}", json={"feedback": 1})
    t.ok("PATCH", f"/{fixed['id']}", json={"feedback": -1, "corrected_response": "FIXED"})
    t.ok("PATCH", f"/{bad['id']}", json={"feedback": -1})

    f = t.ok("POST", "/export", json={"filename": "curated.jsonl"})
    assert (f["object"], f["purpose"], f["filename"]) == ("file", "fine-tune", "curated.jsonl")
    lines = [json.loads(x) for x in t.oai.files.content(f["id"]).read().splitlines()]
    turn = lambda e, answer: {"messages": [*e["messages"], {"role": "assistant", "content": answer}]}  # noqa: E731
    assert lines == [turn(good, good["response"]), turn(fixed, "FIXED"), turn(plain, plain["response"])]
    assert f["id"] in [x.id for x in t.oai.files.list()] and f["bytes"] == len(t.oai.files.content(f["id"]).read())
    only = t.ok("POST", "/export", json={"feedback": -1})
    assert [json.loads(x) for x in t.oai.files.content(only["id"]).read().splitlines()] == [turn(fixed, "FIXED")]
    refused(t.call("POST", "/export", json={"until": 0}), 400, "no log entries to export")
    refused(t.call("POST", "/export", json={"feedback": "yes"}), 400, "feedback must be")
    monkeypatch.setattr(server.ctx.files, "max_file_bytes", only["bytes"])  # room for one line, not three
    refused(t.call("POST", "/export", json={}), 413, "narrow it with finetune, since, until or feedback")
    assert t.ok("POST", "/export", json={"feedback": -1})["bytes"] == only["bytes"]


def test_another_account_sees_none_of_the_logs(server):
    alice, bob = Tenant(server, "logs-alice"), Tenant(server, "logs-bob")
    alice.chat("alice's secret", ON)
    (entry,) = alice.logs()
    assert bob.logs() == []
    for method, kwargs in (("GET", {}), ("PATCH", {"json": {"feedback": 1}}), ("DELETE", {})):
        refused(bob.call(method, f"/{entry['id']}", **kwargs), 404, "no log entry")
    refused(bob.call("POST", "/export", json={}), 400, "no log entries to export")
    assert list(bob.oai.files.list()) == []
    refused(httpx.get(f"{alice.base}/logs", headers={"Authorization": f"Bearer {bob.token}"}), 403, "forbidden")
    assert alice.ok("GET", f"/{entry['id']}")["feedback"] is None


def test_bounds_entries_bytes_and_retention(server):
    t = Tenant(server, "logs-bounds")
    t.ok("PUT", "/settings", json={"enabled": True, "retention_days": 2})
    for i in range(BOUNDS.max_entries_per_account + 2):
        t.chat(f"entry {i}")
    entries = t.logs()
    assert [e["messages"][0]["content"] for e in entries] == [f"entry {i}" for i in range(7, 1, -1)]  # oldest dropped

    before = dropped(server, "too_large")
    t.chat("x" * BOUNDS.max_entry_bytes)  # served as always; its entry is skipped
    assert [e["id"] for e in t.logs()] == [e["id"] for e in entries]
    assert dropped(server, "too_large") == before + 1
    refused(t.call("PATCH", f"/{entries[0]['id']}", json={"corrected_response": "y" * BOUNDS.max_entry_bytes}),
            413, "the limit is 400")

    store = server.ctx.request_logs.store
    try:
        store.clock = lambda: time.time() + 1.5 * 86400  # inside the retention of 2 days
        assert len(t.logs()) == 6
        store.clock = lambda: time.time() + 3 * 86400  # past it: expired entries are never shown
        assert t.logs() == [] and t.call("GET", f"/{entries[0]['id']}").status_code == 404
        assert store.sweep() >= 6
    finally:
        store.clock = time.time


@pytest.fixture
def small_queue_server(model_dir, tmp_path):
    live = LiveServer.start(server_options(model_dir, tmp_path, request_logs=RequestLogConfig(max_queued=2)))
    yield live
    live.stop()


def test_a_full_queue_or_a_failing_store_never_blocks_or_fails_a_generation(small_queue_server, monkeypatch):
    server = small_queue_server
    t = Tenant(server, "logs-faults")
    t.ok("PUT", "/settings", json={"enabled": True})
    store, taken, release = server.ctx.request_logs.store, threading.Event(), threading.Event()
    real_add = store.add

    def slow_add(record):
        taken.set()
        release.wait(60)
        return real_add(record)

    monkeypatch.setattr(store, "add", slow_add)
    before = dropped(server, "queue_full")
    t.chat("held by the writer")
    assert taken.wait(30)
    for i in range(2 + 1):  # the writer is stuck: its queue (2) fills, the last record is dropped
        assert t.chat(f"queued {i}").choices[0].finish_reason in ("stop", "length")
    assert dropped(server, "queue_full") == before + 1
    release.set()
    assert len(t.logs()) == 1 + 2

    def failing_add(record):
        raise OSError("disk full")

    monkeypatch.setattr(store, "add", failing_add)
    before = dropped(server, "store_error")
    assert t.chat("the store fails").choices[0].message.content is not None
    server.ctx.request_logs.writer.drain()
    assert dropped(server, "store_error") == before + 1
