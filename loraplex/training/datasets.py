"""Validation of OpenAI chat-format fine-tuning JSONL, with errors that name the line.

Contract: `validate_chat_jsonl(data, count_tokens, max_tokens)` takes the raw file bytes and
returns a `DatasetSummary`; on any bad line it raises `InvalidInput` whose message lists up to
`MAX_REPORTED_ERRORS` problems, each as "line N: what is wrong" (lines count from 1, blank lines
are skipped but still counted). Pure function: no I/O, no shared state, safe in any thread.

A valid line is a JSON object `{"messages": [...]}` where every message is an object with a
`role` in {system, user, assistant} and a non-empty string `content`, at least one message is
from the assistant (the loss is on assistant tokens only), and the conversation, rendered by the
caller's `count_tokens`, fits `max_tokens`.

`chat_example(...)` turns one logged generation into such a line (or None when it is left out of
an export); the export route writes those lines and validates the file like an upload.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from loraplex.errors import InvalidInput

ROLES = ("system", "user", "assistant")
MAX_REPORTED_ERRORS = 10


@dataclass(frozen=True)
class DatasetSummary:
    examples: int  # valid lines
    tokens: int  # sum of count_tokens over all examples (0 when no counter is given)


def _line_problem(obj, count_tokens, max_tokens) -> tuple[str | None, int]:
    """(problem or None, token count) for one parsed line."""
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
        return 'expected an object with a "messages" list', 0
    messages = obj["messages"]
    if not messages:
        return '"messages" is empty', 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"message {i} is not an object", 0
        if m.get("role") not in ROLES:
            return f"message {i} has role {m.get('role')!r}; expected one of {', '.join(ROLES)}", 0
        content = m.get("content")
        if not isinstance(content, str) or not content.strip():
            return f"message {i} ({m['role']}) has no content", 0
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant message to learn from", 0
    tokens = count_tokens(messages) if count_tokens else 0
    if max_tokens is not None and tokens > max_tokens:
        return f"{tokens} tokens exceed the context of {max_tokens}", tokens
    return None, tokens


def validate_chat_jsonl(data: bytes, count_tokens: Callable[[list], int] | None = None,
                        max_tokens: int | None = None) -> DatasetSummary:
    """Check every line; raise InvalidInput naming the bad lines, or return the summary."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidInput(f"the file is not UTF-8 (byte {e.start})") from None
    problems: list[str] = []
    examples = tokens = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            problem, n = f"not valid JSON ({e.msg} at column {e.colno})", 0
        else:
            problem, n = _line_problem(obj, count_tokens, max_tokens)
        if problem:
            problems.append(f"line {number}: {problem}")
        else:
            examples += 1
            tokens += n
    if problems:
        more = len(problems) - MAX_REPORTED_ERRORS
        shown = "; ".join(problems[:MAX_REPORTED_ERRORS])
        raise InvalidInput(f"invalid training file: {shown}" + (f" (and {more} more)" if more > 0 else ""))
    if examples == 0:
        raise InvalidInput("invalid training file: no examples")
    return DatasetSummary(examples=examples, tokens=tokens)


EXPORTED_FINISH_REASONS = ("stop", "length")


def chat_example(messages: list[dict], response: str, corrected_response: str | None, feedback: int | None,
                 finish_reason: str | None) -> dict | None:
    """One logged generation as a training example `{"messages": [..., assistant]}`, the corrected
    response replacing the original; None when it is left out of a dataset: a raw prompt (no
    messages), a role the format has not got, feedback −1 without a correction, an aborted or
    failed generation without a correction, or an empty answer."""
    answer = corrected_response if corrected_response is not None else response
    if corrected_response is None and (feedback == -1 or finish_reason not in EXPORTED_FINISH_REASONS):
        return None
    if not messages or not answer.strip() or any(m.get("role") not in ROLES for m in messages):
        return None
    return {"messages": [*messages, {"role": "assistant", "content": answer}]}
