"""Prompt sets: many prompts through the same columns in one job, every row stored in the session as a comparison
(tagged with the set's name, so ratings can be filtered by it).

A prompt set is a .jsonl file (a ``prompt`` field: text, or chat messages; or a ``messages`` field), a .csv file (a
``prompt`` column, else the first column), or a .txt file (one prompt per line). A session's system prompt is put
in front of every prompt that has none."""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from engine.errors import Cancelled, TsdpoError
from engine.progress import Phase, ProgressFn

Prompt = str | list[dict]
ROLES = ("system", "user", "assistant")


class PromptSetError(TsdpoError):
    pass


@dataclass
class PromptSet:
    name: str
    prompts: list[Prompt]
    source: str = ""


def _messages(value, where: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise PromptSetError(f"{where}: chat messages are a non-empty list of {{'role', 'content'}} objects.")
    out = []
    for m in value:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise PromptSetError(f"{where}: every message needs a role ({', '.join(ROLES)}) and a text content; got {m!r}.")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise PromptSetError(f"{where}: the last message must be the user's (the model answers it).")
    return out


def _row_prompt(row, where: str) -> Prompt:
    if isinstance(row, dict):
        if "messages" in row:
            return _messages(row["messages"], where)
        value = row.get("prompt")
        if isinstance(value, list):
            return _messages(value, where)
        if isinstance(value, str) and value.strip():
            return value
        raise PromptSetError(f"{where}: no 'prompt' (text or chat messages) or 'messages' field.")
    raise PromptSetError(f"{where}: a JSON object with a 'prompt' or 'messages' field is expected.")


def read_prompt_set(path: str | Path, limit: Optional[int] = None, name: Optional[str] = None) -> PromptSet:
    """The prompts of a .jsonl, .csv or .txt file; a row that cannot be read is an error naming its line."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise PromptSetError(f"No prompt set at {p}: give a .jsonl (a 'prompt' or 'messages' field per line), a .csv "
                             "(a 'prompt' column) or a .txt (one prompt per line).")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PromptSetError(f"{p} is not valid UTF-8 text (byte {exc.start}); save it as UTF-8.") from None
    prompts: list[Prompt] = []
    if p.suffix.lower() in (".jsonl", ".json"):
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise PromptSetError(f"{p}, line {i}: not JSON ({exc}).") from None
            prompts.append(_row_prompt(row, f"{p}, line {i}"))
    elif p.suffix.lower() == ".csv":
        rows = list(csv.reader(io.StringIO(text)))
        if not rows:
            raise PromptSetError(f"{p} is empty.")
        header = [h.strip().lower() for h in rows[0]]
        col, body = (header.index("prompt"), rows[1:]) if "prompt" in header else (0, rows)
        for i, row in enumerate(body, 2 if "prompt" in header else 1):
            if len(row) > col and row[col].strip():
                prompts.append(row[col])
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise PromptSetError(f"{p} holds no prompts.")
    return PromptSet(name or p.stem, prompts[:limit] if limit else prompts, str(p))


def with_system(prompt: Prompt, system: Optional[str]) -> Prompt:
    """The prompt with the session's system prompt in front (unless it has its own, or there is none)."""
    if not system:
        return prompt
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if messages and messages[0]["role"] == "system":
        return messages
    return [{"role": "system", "content": system}, *messages]


def prompt_text(prompt: Prompt) -> str:
    """What a person reads as the prompt: the text, or the last user message of a chat."""
    if isinstance(prompt, str):
        return prompt
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")


@dataclass
class Row:
    index: int
    prompt: Prompt
    comparison_id: Optional[int]
    columns: list[dict]  # label, text, n_tokens, seconds, tokens_per_s, truncated, stopped, generation_id
    save_error: Optional[str] = None

    def to_json(self) -> dict:
        return {"index": self.index, "prompt": self.prompt, "comparison_id": self.comparison_id, "columns": self.columns,
                **({"save_error": self.save_error} if self.save_error else {})}


@dataclass
class RunResult:
    name: str
    rows: list[Row] = field(default_factory=list)
    seconds: float = 0.0
    stopped: bool = False


def run_prompt_set(lm, prompt_set: PromptSet, columns: Sequence, params, *, mixer=None, store=None,
                   session_id: Optional[int] = None, system: Optional[str] = None, blind: bool = False,
                   progress: Optional[ProgressFn] = None, on_row: Optional[Callable[[Row], None]] = None,
                   stop=None) -> RunResult:
    """Every prompt through ``columns`` (``engine.generation.Column``s, batched as the mixer allows), one stored
    comparison per prompt tagged with the set's name and the row's index. ``stop`` (a CancelToken) ends the run
    after the row in progress, whose partial replies are kept; rows already done are saved either way."""
    from engine.generation import compare

    if not columns:
        raise PromptSetError("A prompt set runs through at least one column.")
    result = RunResult(prompt_set.name)
    phase = Phase(progress, f"prompt set {prompt_set.name}", len(prompt_set.prompts))
    t0 = time.perf_counter()
    for i, prompt in enumerate(prompt_set.prompts):
        if stop is not None and stop.is_set():
            result.stopped = True
            break
        full = with_system(prompt, system)
        comp = compare(lm, full, columns, params, mixer=mixer, stop=stop, store=store, session_id=session_id, blind=blind,
                       extra={"prompt_set": prompt_set.name, "row": i})
        row = Row(i, full, comp.comparison_id, [
            {"label": cr.column.label, "text": cr.result.text, "n_tokens": cr.result.n_tokens,
             "seconds": round(cr.result.seconds, 3), "tokens_per_s": round(cr.result.tokens_per_s, 2),
             "truncated": cr.result.truncated, "stopped": cr.result.stopped, "generation_id": cr.generation_id}
            for cr in comp.columns], getattr(comp, "save_error", None))
        result.rows.append(row)
        if on_row is not None:
            on_row(row)
        phase.update(i + 1)
    result.seconds = time.perf_counter() - t0
    if stop is not None and stop.is_set():
        result.stopped = True
    if result.stopped and not result.rows:
        raise Cancelled(f"the prompt set {prompt_set.name} (no row finished)")
    return result
