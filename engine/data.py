"""Preference pairs: one ``PairSet`` per objective, read from the formats people already have.

Formats (``--format``), detected from the columns when not given:

- ``trl``: ``prompt/chosen/rejected`` as plain strings or chat messages; also the implicit-prompt form
  (``chosen/rejected`` conversations only, the prompt being their shared beginning).
- ``ultrafeedback``: UltraFeedback-binarized (TRL's plain-string copy or HuggingFaceH4's message lists).
- ``hh-rlhf``: whole ``\\n\\nHuman: ... \\n\\nAssistant: ...`` dialogues, split at the last assistant turn.
- ``helpsteer``: one response per row with 0-4 attribute scores; responses to the same prompt become
  pairs per attribute, ties dropped.

Objectives without labels are built from length: ``verbosity`` prefers the longer response,
``conciseness`` the shorter one.
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import itertools
import json
import math
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from engine.errors import DataError

FORMATS = ("trl", "ultrafeedback", "hh-rlhf", "helpsteer")
HELPSTEER_ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
LENGTH_OBJECTIVES = {"verbosity": True, "conciseness": False}  # objective -> longer preferred
DEFAULT_OBJECTIVE = {"ultrafeedback": "helpfulness", "hh-rlhf": "harmlessness", "helpsteer": "helpfulness"}
_ROLES = {"system", "user", "assistant", "tool"}

Messages = list  # list of {"role": str, "content": str}


@dataclass
class Pair:
    prompt: Messages
    chosen: str
    rejected: str
    line: int = 0
    score_gap: Optional[float] = field(default=None, compare=False)  # chosen's score minus rejected's, where rated

    def key(self) -> str:
        return json.dumps([self.prompt, self.chosen, self.rejected], ensure_ascii=False, sort_keys=True)

    def prompt_key(self) -> str:
        """The prompt alone, as ``key`` writes it: pairs on the same prompt share it."""
        return json.dumps(self.prompt, ensure_ascii=False, sort_keys=True)


@dataclass
class RowProblem:
    """A row that gave no pair: ``malformed`` (the row is broken) or ``skipped`` (valid, but carries no
    preference, e.g. a tie)."""

    line: int
    reason: str
    unit: str = "line"
    kind: str = "malformed"

    def __str__(self) -> str:
        return f"{self.unit} {self.line}: {self.reason}"


@dataclass
class PairSet:
    objective: str
    pairs: list[Pair]
    source: str = ""
    format: str = ""
    problems: list[RowProblem] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self) -> Iterator[Pair]:
        return iter(self.pairs)

    def limit(self, n: Optional[int]) -> "PairSet":
        return self if n is None else replace(self, pairs=self.pairs[: max(int(n), 0)])

    def split(self, val_fraction: float = 0.1, seed: int = 0) -> tuple["PairSet", "PairSet"]:
        """Deterministic train/validation split: a pair's side depends on its content and the seed only,
        not on the row order, so adding rows to a file does not reshuffle the others."""
        if not 0.0 <= val_fraction < 1.0:
            raise DataError(f"Validation fraction must be in [0, 1), got {val_fraction}.")
        ranked = sorted(range(len(self.pairs)),
                        key=lambda i: hashlib.sha256(f"{seed}\0{self.pairs[i].key()}".encode()).digest())
        n_val = round(len(self.pairs) * val_fraction)
        if val_fraction > 0 and len(self.pairs) >= 2:
            n_val = min(max(n_val, 1), len(self.pairs) - 1)
        val_idx = set(ranked[:n_val])
        train = [p for i, p in enumerate(self.pairs) if i not in val_idx]
        val = [p for i, p in enumerate(self.pairs) if i in val_idx]
        return replace(self, pairs=train), replace(self, pairs=val, problems=[])

    def data_hash(self) -> str:
        h = hashlib.sha256(self.objective.encode())
        for p in self.pairs:
            h.update(p.key().encode())
        return h.hexdigest()

    def stats(self) -> dict:
        if not self.pairs:
            return {"pairs": 0}
        lc = [len(p.chosen) for p in self.pairs]
        lr = [len(p.rejected) for p in self.pairs]
        lp = [sum(len(m["content"]) for m in p.prompt) for p in self.pairs]
        return {
            "pairs": len(self.pairs),
            "malformed_rows": sum(p.kind == "malformed" for p in self.problems),
            "skipped_rows": sum(p.kind == "skipped" for p in self.problems),
            "prompt_chars_mean": round(statistics.fmean(lp), 1),
            "chosen_chars_mean": round(statistics.fmean(lc), 1),
            "rejected_chars_mean": round(statistics.fmean(lr), 1),
            "chosen_chars_median": statistics.median(lc),
            "rejected_chars_median": statistics.median(lr),
            "chosen_longer_fraction": round(sum(c > r for c, r in zip(lc, lr)) / len(lc), 3),
            "multi_turn_prompts": sum(len(p.prompt) > 1 for p in self.pairs),
            **({"score_gap_median": statistics.median(gaps), "score_gap_under_1": sum(g < 1 for g in gaps)}
               if (gaps := [p.score_gap for p in self.pairs if p.score_gap is not None]) else {}),
        }


class _RowError(Exception):
    kind = "malformed"


class _RowSkip(_RowError):
    kind = "skipped"


# --------------------------------------------------------------------------------------------- reading rows

def _maybe_json(value: Any) -> Any:
    """CSV cells holding chat messages arrive as JSON text."""
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _read_rows(source: str, split: str) -> tuple[Iterator[tuple[int, Any]], str]:
    """Yield (line or row number, row dict or _RowError) and the unit the numbers count."""
    path = Path(source).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json", ".ndjson"):
            head = path.read_text(encoding="utf-8", errors="replace").lstrip()[:1]
            if suffix == ".json" and head == "[":
                try:
                    rows = json.loads(path.read_text(encoding="utf-8"))
                except ValueError as exc:
                    raise DataError(f"{path} is not valid JSON: {exc}. Fix the file or save it as JSON lines.") from exc
                return ((i + 1, r) for i, r in enumerate(rows)), "row"
            return _jsonl_rows(path), "line"
        if suffix in (".csv", ".tsv"):
            return _csv_rows(path, "\t" if suffix == ".tsv" else ","), "line"
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                rows = pq.read_table(path).to_pylist()
            except Exception as exc:
                raise DataError(f"{path} could not be read as Parquet: {exc}.") from exc
            return ((i + 1, r) for i, r in enumerate(rows)), "row"
        raise DataError(f"{path}: unsupported file type {suffix!r}. Use .jsonl, .json, .csv, .tsv or .parquet.")
    return _dataset_rows(source, split), "row"


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except ValueError as exc:
                yield n, _RowError(f"not valid JSON ({exc.msg} at column {exc.colno})")


def _csv_rows(path: Path, delimiter: str) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        for row in reader:
            if None in row:
                yield reader.line_num, _RowError("more cells than the header has columns")
                continue
            yield reader.line_num, {k: _maybe_json(v) for k, v in row.items()}


def _dataset_rows(name: str, split: str) -> Iterator[tuple[int, Any]]:
    """A `datasets` name (or a local folder `datasets` can read)."""
    looks_local = name.startswith((".", "/", "~")) or name.endswith((".jsonl", ".json", ".csv", ".parquet"))
    if looks_local and not Path(name).expanduser().exists():
        raise DataError(f"No data at {name}: the file or folder does not exist. Check the path.")
    try:
        import datasets

        ds = datasets.load_dataset(str(Path(name).expanduser()) if looks_local else name, split=split)
    except Exception as exc:
        raise DataError(
            f"Could not load dataset {name!r} (split {split!r}): {type(exc).__name__}: {exc}. "
            "Check the name and your network, or give a local .jsonl/.csv/.parquet file."
        ) from exc
    return ((i + 1, row) for i, row in enumerate(ds))


# --------------------------------------------------------------------------------------------- row parsing

def _as_row(row: Any) -> dict:
    """A row as read: an object, or the reason it could not be read."""
    if isinstance(row, _RowError):
        raise row
    if not isinstance(row, dict):
        raise _RowError("row is not an object")
    return row


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise _RowError(f"{what} should be text, got {type(value).__name__}")
    if not value.strip():
        raise _RowError(f"{what} is empty")
    return value


def _messages(value: Any, what: str) -> Messages:
    if not isinstance(value, list) or not value:
        raise _RowError(f"{what} should be a non-empty list of chat messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise _RowError(f"{what}[{i}] is not a chat message with role and content")
        if m["role"] not in _ROLES:
            raise _RowError(f"{what}[{i}] has unknown role {m['role']!r}")
        if not isinstance(m["content"], str):
            raise _RowError(f"{what}[{i}] content should be text")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _prompt(value: Any) -> Messages:
    if isinstance(value, str):
        return [{"role": "user", "content": _text(value, "prompt")}]
    msgs = _messages(value, "prompt")
    if msgs[-1]["role"] == "assistant":
        raise _RowError("prompt ends with an assistant turn")
    return msgs


def _response(value: Any, what: str, prompt: Messages) -> str:
    """A completion: plain text, or messages whose last turn is the assistant's reply.
    Message lists may repeat the prompt first (HuggingFaceH4 style); that part is checked and dropped."""
    if isinstance(value, str):
        return _text(value, what)
    msgs = _messages(value, what)
    if msgs[-1]["role"] != "assistant":
        raise _RowError(f"{what} does not end with an assistant message")
    if len(msgs) > 1 and msgs[:-1] != prompt and msgs[:-1] != prompt[-len(msgs) + 1:]:
        raise _RowError(f"{what} repeats a conversation that differs from the prompt")
    return _text(msgs[-1]["content"], f"{what} reply")


def _pair(prompt: Messages, chosen: str, rejected: str, line: int) -> Pair:
    if chosen.strip() == rejected.strip():
        raise _RowSkip("chosen and rejected are identical")
    return Pair(prompt, chosen, rejected, line)


def _parse_trl(row: dict, line: int) -> Pair:
    for col in ("chosen", "rejected"):
        if col not in row or row[col] is None:
            raise _RowError(f"missing column {col!r}")
    if row.get("prompt") is not None:
        prompt = _prompt(row["prompt"])
        return _pair(prompt, _response(row["chosen"], "chosen", prompt), _response(row["rejected"], "rejected", prompt), line)
    # Implicit prompt: two conversations that share everything but the last assistant reply.
    c, r = _messages(row["chosen"], "chosen"), _messages(row["rejected"], "rejected")
    if c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
        raise _RowError("chosen and rejected must end with an assistant reply")
    if c[:-1] != r[:-1] or len(c) < 2:
        raise _RowError("no prompt column, and chosen and rejected do not share the turns before the last reply")
    return _pair(c[:-1], _text(c[-1]["content"], "chosen reply"), _text(r[-1]["content"], "rejected reply"), line)


def _parse_ultrafeedback(row: dict, line: int) -> Pair:
    meta = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
    sc = row.get("score_chosen", meta.get("score_chosen"))
    sr = row.get("score_rejected", meta.get("score_rejected"))
    rated = isinstance(sc, (int, float)) and isinstance(sr, (int, float))
    if rated and sc <= sr:
        raise _RowSkip(f"tie or inverted scores (chosen {sc}, rejected {sr})")
    pair = _parse_trl(row, line)
    pair.score_gap = float(sc - sr) if rated else None
    return pair


_HUMAN, _ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def _hh_dialogue(text: str) -> Messages:
    """'\\n\\nHuman: a\\n\\nAssistant: b ...' -> messages."""
    msgs: Messages = []
    rest = text
    if not rest.startswith(_HUMAN):
        rest = _HUMAN + " " + rest.lstrip() if not rest.startswith(_ASSISTANT) else rest
    while rest:
        role = "user" if rest.startswith(_HUMAN) else "assistant"
        rest = rest[len(_HUMAN if role == "user" else _ASSISTANT):]
        nxt = [i for i in (rest.find(_HUMAN), rest.find(_ASSISTANT)) if i >= 0]
        end = min(nxt) if nxt else len(rest)
        msgs.append({"role": role, "content": rest[:end].strip()})
        rest = rest[end:]
    return msgs


def _parse_hh(row: dict, line: int) -> Pair:
    halves = []
    for col in ("chosen", "rejected"):
        text = _text(row.get(col), col)
        cut = text.rfind(_ASSISTANT)
        if cut < 0:
            raise _RowError(f"{col} has no '\\n\\nAssistant:' turn")
        halves.append((text[:cut], text[cut + len(_ASSISTANT):].strip()))
    (pc, c), (pr, r) = halves
    if pc.strip() != pr.strip():
        raise _RowError("chosen and rejected dialogues differ before the last assistant turn")
    if not c or not r:
        raise _RowError("empty last assistant reply")
    prompt = _hh_dialogue(pc)
    if not prompt or prompt[-1]["role"] != "user":
        raise _RowError("the dialogue before the last assistant turn does not end with a human turn")
    return _pair(prompt, c, r, line)


_PARSERS = {"trl": _parse_trl, "ultrafeedback": _parse_ultrafeedback, "hh-rlhf": _parse_hh}


def _helpsteer_pairs(rows: Iterable[tuple[int, Any]], attribute: Optional[str], longer: Optional[bool],
                     problems: list[RowProblem], unit: str) -> list[Pair]:
    """Group responses by prompt; every two responses with different scores (or lengths) make a pair."""
    groups: dict[str, list[tuple[int, str, Any]]] = {}
    for line, row in rows:
        try:
            row = _as_row(row)
            prompt = _text(row.get("prompt"), "prompt")
            response = _text(row.get("response"), "response")
            score = None
            if attribute is not None:
                score = row.get(attribute)
                if isinstance(score, str) and score.strip().lstrip("-").isdigit():
                    score = int(score)
                if not isinstance(score, (int, float)) or not 0 <= score <= 4:
                    raise _RowError(f"{attribute} score should be a number from 0 to 4, got {score!r}")
            groups.setdefault(prompt, []).append((line, response, score))
        except _RowError as exc:
            problems.append(RowProblem(line, str(exc), unit))
    pairs = []
    for prompt, items in groups.items():
        for (la, a, sa), (lb, b, sb) in itertools.combinations(items, 2):
            gap = None
            if longer is None:
                if sa == sb:
                    continue
                hi, lo = ((a, b) if sa > sb else (b, a))
                gap = float(abs(sa - sb))
            else:
                if len(a) == len(b) or a.strip() == b.strip():
                    continue
                hi, lo = ((a, b) if (len(a) > len(b)) == longer else (b, a))
            pairs.append(Pair([{"role": "user", "content": prompt}], hi, lo, min(la, lb), gap))
    return pairs


def detect_format(rows: list[Any]) -> str:
    """Tell the format from the columns of the first rows."""
    sample = [r for r in rows if isinstance(r, dict)]
    if not sample:
        raise DataError("Could not tell the data format: the first rows are not JSON objects.")
    cols = set().union(*(r.keys() for r in sample))
    if {"prompt", "response"} <= cols and cols & set(HELPSTEER_ATTRIBUTES):
        return "helpsteer"
    if {"chosen", "rejected"} <= cols:
        if "prompt" not in cols:
            first = sample[0].get("chosen")
            return "hh-rlhf" if isinstance(first, str) and _ASSISTANT in first else "trl"
        meta = sample[0].get("metadata")
        if {"score_chosen", "prompt_id"} & cols or (isinstance(meta, dict) and "score_chosen" in meta):
            return "ultrafeedback"
        return "trl"
    raise DataError(
        f"Could not tell the data format from the columns {sorted(cols)}. "
        f"Pass --format {'|'.join(FORMATS)}; pairs need prompt/chosen/rejected (or chosen/rejected dialogues, "
        "or prompt/response with attribute scores)."
    )


def load_pairs(
    source: str | Path,
    *,
    format: Optional[str] = None,
    objective: Optional[str] = None,
    limit: Optional[int] = None,
    split: str = "train",
    attribute: Optional[str] = None,
    min_length_ratio: float = 1.1,
    length_matched: Optional[float] = None,
    length_balanced: Optional[float] = None,
    min_score_gap: Optional[float] = None,
) -> PairSet:
    """Read preference pairs from a file or a `datasets` name.

    ``objective`` names the preference; ``verbosity`` / ``conciseness`` rebuild the pairs from the
    responses' lengths (longer / shorter preferred; pairs whose lengths differ by less than
    ``min_length_ratio`` are dropped as uninformative). For HelpSteer rows ``attribute`` picks the score
    (default: the objective if it is an attribute, else helpfulness). ``length_matched`` (e.g. 1.2) keeps only
    pairs whose two responses are within that length ratio of each other, so that a direction trained on them
    cannot be a length direction in disguise (``length_matched_pairs``). ``length_balanced`` (e.g. 2) keeps, of the
    pairs within that ratio, as many with the longer reply preferred as with the shorter one, matched by how much
    longer, so that length says nothing about the label and more pairs stay (``length_balanced_pairs``).
    ``min_score_gap`` keeps only pairs whose chosen reply was rated at least that much above the rejected one
    (UltraFeedback's ``score_chosen - score_rejected``, HelpSteer's attribute scores), so that near-ties, whose labels
    are closest to noise, do not dilute the signal; it applies before the length selections.
    """
    for flag, ratio in (("length-matched", length_matched), ("length-balanced", length_balanced)):
        if ratio is not None and not ratio >= 1:
            raise DataError(f"A {flag} ratio is 1 or more (1.2: within 20%), not {ratio}.")
        if ratio is not None and objective in LENGTH_OBJECTIVES:
            raise DataError(f"{objective} pairs are made from length differences; they cannot also be {flag}.")
    if length_matched is not None and length_balanced is not None:
        raise DataError("Use --length-matched or --length-balanced, not both (balanced pairs are already within "
                        "their ratio).")
    if min_score_gap is not None and not min_score_gap > 0:
        raise DataError(f"A minimum score gap is above 0 (ties are never pairs), not {min_score_gap}.")
    if min_score_gap is not None and objective in LENGTH_OBJECTIVES:
        raise DataError(f"{objective} pairs are made from length differences and carry no scores; drop --min-score-gap.")
    if format is not None and format not in FORMATS:
        raise DataError(f"Unknown format {format!r}: use one of {', '.join(FORMATS)}.")
    source = str(source)
    rows_iter, unit = _read_rows(source, split)
    rows = list(rows_iter)
    if not rows:
        raise DataError(f"{source} has no rows.")
    if format is None:
        readable = [r for _, r in rows[:50] if isinstance(r, dict)]
        if not readable:
            broken = "; ".join(f"{unit} {n}: {r}" for n, r in rows[:3] if isinstance(r, _RowError))
            raise DataError(f"{source}: none of the first rows could be read ({broken or 'not JSON objects'}). "
                            "Fix the file or check that it is the right one.")
    fmt = format or detect_format(readable)
    length_pref = LENGTH_OBJECTIVES.get(objective) if objective else None
    problems: list[RowProblem] = []
    if fmt == "helpsteer":
        if attribute is None and length_pref is None:
            attribute = objective if objective in HELPSTEER_ATTRIBUTES else "helpfulness"
        if attribute is not None and attribute not in HELPSTEER_ATTRIBUTES:
            raise DataError(f"Unknown HelpSteer attribute {attribute!r}: use one of {', '.join(HELPSTEER_ATTRIBUTES)}.")
        pairs = _helpsteer_pairs(rows, None if length_pref is not None else attribute, length_pref, problems, unit)
        name = objective or attribute
    else:
        parse = _PARSERS[fmt]
        pairs = []
        for line, row in rows:
            try:
                pairs.append(parse(_as_row(row), line))
            except _RowError as exc:
                problems.append(RowProblem(line, str(exc), unit, exc.kind))
        name = objective or DEFAULT_OBJECTIVE.get(fmt) or Path(source).stem
    result = PairSet(name, pairs, source=source, format=fmt, problems=problems)
    if length_pref is not None and fmt != "helpsteer":
        result = length_pairs(result, longer=length_pref, min_ratio=min_length_ratio)
    if min_score_gap is not None:
        result = score_gap_pairs(result, min_score_gap)
    for ratio, select, fails in ((length_matched, length_matched_pairs, "has responses within"),
                                 (length_balanced, length_balanced_pairs,
                                  "is left when balanced (one side has no pair in it) within")):
        if ratio is not None:
            before = len(result.pairs)
            result = select(result, ratio)
            if not result.pairs:
                raise DataError(f"None of the {before} pairs in {source} {fails} a length ratio of {ratio:g}; use a "
                                "larger ratio.")
    if not result.pairs:
        shown = "; ".join(str(p) for p in problems[:3])
        raise DataError(
            f"{source} has no usable {fmt} pairs" + (f" ({len(problems)} malformed rows, e.g. {shown})." if problems else ".")
            + " Check --format and the columns."
        )
    return result.limit(limit)


def _lengths(p: Pair) -> tuple[int, int]:
    return len(p.chosen.strip()), len(p.rejected.strip())


def score_gap_pairs(pairs: PairSet, min_gap: float) -> PairSet:
    """The pairs whose chosen reply was rated at least ``min_gap`` above the rejected one. Data without scores, or
    with none that far apart, is an error: a filter that silently keeps everything, or nothing, is a wrong answer."""
    gaps = [p.score_gap for p in pairs.pairs if p.score_gap is not None]
    if not gaps:
        raise DataError(f"{pairs.source} carries no scores ({pairs.format} rows): --min-score-gap works on rated data "
                        "(UltraFeedback's score_chosen / score_rejected, HelpSteer's attributes). Drop it for this file.")
    kept = [p for p in pairs.pairs if p.score_gap is not None and p.score_gap >= min_gap]
    if not kept:
        raise DataError(f"None of the {len(pairs.pairs)} pairs in {pairs.source} has a score gap of {min_gap:g} or more "
                        f"(the largest is {max(gaps):g}); use a smaller --min-score-gap.")
    return replace(pairs, pairs=kept, source=f"{pairs.source} (score gap {min_gap:g} or more: {len(kept)} of "
                                             f"{len(pairs.pairs)} pairs)")


def length_matched_pairs(pairs: PairSet, max_ratio: float) -> PairSet:
    """The pairs whose chosen and rejected responses are within ``max_ratio`` of each other in length (characters):
    what stays when preferring the shorter or the longer answer is not what the labels say."""
    kept = [p for p in pairs.pairs if max(_lengths(p)) <= max_ratio * max(min(_lengths(p)), 1)]
    return replace(pairs, pairs=kept, source=f"{pairs.source} (length-matched within {max_ratio:g}x: "
                                             f"{len(kept)} of {len(pairs.pairs)} pairs)")


def length_balanced_pairs(pairs: PairSet, max_ratio: float) -> PairSet:
    """Of the pairs within ``max_ratio`` in length, as many whose preferred reply is the longer one as the shorter
    one, each of the smaller side matched to the unused pair of the other side nearest to it in |log length ratio|
    (pairs of equal length all stay). In what is kept the label cannot be told from the lengths, neither from which
    reply is longer nor from by how much, yet several times more pairs stay than length matching within a tight
    ratio keeps. The kept pairs keep their order."""
    sides: dict[bool, list[tuple[float, int]]] = {True: [], False: []}
    kept = []
    for i, p in enumerate(pairs.pairs):
        a, b = (max(n, 1) for n in _lengths(p))
        if max(a, b) > max_ratio * min(a, b):
            continue
        if a == b:
            kept.append(i)
        else:
            sides[a > b].append((abs(math.log(a / b)), i))
    few, many = sorted((sorted(sides[True]), sorted(sides[False])), key=len)
    kept += [i for _, i in few]
    free = [r for r, _ in many]  # sorted; a matched entry is removed
    idx = [i for _, i in many]
    for r, _ in few:
        j = bisect.bisect_left(free, r)
        if j == len(free) or (j > 0 and r - free[j - 1] <= free[j] - r):
            j -= 1
        kept.append(idx.pop(j))
        free.pop(j)
    kept.sort()
    return replace(pairs, pairs=[pairs.pairs[i] for i in kept],
                   source=f"{pairs.source} (length-balanced within {max_ratio:g}x: {len(kept)} of {len(pairs.pairs)} "
                          f"pairs, the longer reply preferred in {len(few)})")


def length_pairs(pairs: PairSet, longer: bool = True, min_ratio: float = 1.1) -> PairSet:
    """Re-label each pair's two responses by length: the longer (or shorter) one is preferred."""
    out = []
    for p in pairs.pairs:
        a, b = p.chosen, p.rejected
        la, lb = _lengths(p)
        if max(la, lb) < min_ratio * max(min(la, lb), 1) or la == lb:
            continue
        hi, lo = (a, b) if la > lb else (b, a)
        out.append(Pair(p.prompt, hi if longer else lo, lo if longer else hi, p.line))
    return replace(pairs, objective="verbosity" if longer else "conciseness", pairs=out)
