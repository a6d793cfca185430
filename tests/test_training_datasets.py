"""JSONL validation of fine-tuning files: every problem is reported with its line number."""

import json

import pytest

from loraplex.errors import InvalidInput
from loraplex.training.datasets import MAX_REPORTED_ERRORS, validate_chat_jsonl


def _line(*messages) -> str:
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in messages]})


GOOD = _line(("user", "hi"), ("assistant", "ARR, hello"))


def _count(messages) -> int:
    return sum(len(m["content"].split()) for m in messages)


def test_valid_file_is_summarised():
    lines = [GOOD, _line(("system", "be a pirate"), ("user", "a b"), ("assistant", "c"))]
    summary = validate_chat_jsonl("\n\n".join(lines).encode(), _count, max_tokens=100)
    assert summary.examples == 2
    assert summary.tokens == sum(_count(json.loads(line)["messages"]) for line in lines)


@pytest.mark.parametrize("bad, cause", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", '"messages" list'),
    ('{"messages": []}', "is empty"),
    (_line(("user", "hi"), ("robot", "x")), "role 'robot'"),
    (_line(("user", "hi"), ("assistant", "   ")), "message 1 (assistant) has no content"),
    (_line(("user", "hi")), "no assistant message"),
    (_line(("user", "one two three"), ("assistant", "four five")), "exceed the context of 4"),
])
def test_bad_line_is_named(bad, cause):
    data = "\n".join([GOOD, "", bad, GOOD]).encode()
    with pytest.raises(InvalidInput) as err:
        validate_chat_jsonl(data, _count, max_tokens=4)
    assert "line 3: " in str(err.value)
    assert cause in str(err.value)
    assert "line 1" not in str(err.value) and "line 4" not in str(err.value)


def test_many_errors_are_capped_and_counted():
    data = "\n".join(["{"] * (MAX_REPORTED_ERRORS + 3)).encode()
    with pytest.raises(InvalidInput) as err:
        validate_chat_jsonl(data)
    assert str(err.value).count("line ") == MAX_REPORTED_ERRORS
    assert "(and 3 more)" in str(err.value)


def test_empty_and_non_utf8_files_are_refused():
    with pytest.raises(InvalidInput, match="no examples"):
        validate_chat_jsonl(b"\n\n")
    with pytest.raises(InvalidInput, match="not UTF-8"):
        validate_chat_jsonl(b"\xff\xfe")
