"""Data, step 2: which format the records have (alpaca, prompt-response, messages, text) and their fields.

The format is given (``--format``) or detected from the column names; the columns are given or found
(:data:`PROMPT_RESPONSE_PAIRS`, :data:`MESSAGES_COLUMNS`, :data:`TEXT_COLUMNS`, case-insensitive).
"""

from __future__ import annotations

import json

from ..constants import FORMATS
from ..errors import QloraGaError
from .config import DataConfig, _error


# (prompt column, response column) pairs tried in order by the auto-detection (case-insensitive)
PROMPT_RESPONSE_PAIRS = (
    ("prompt", "response"), ("prompt", "completion"), ("prompt", "answer"), ("prompt", "output"),
    ("question", "answer"), ("question", "response"), ("instruction", "output"), ("instruction", "response"),
    ("input", "output"), ("query", "response"), ("query", "answer"), ("source", "target"),
    ("input", "target"), ("context", "response"),
)
MESSAGES_COLUMNS = ("messages", "conversations", "conversation")
TEXT_COLUMNS = ("text",)
_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant", "chatgpt": "assistant"}


def _find(columns: list[str], name: str) -> str | None:
    """The column called ``name`` (exact, else case-insensitive)."""
    if name in columns:
        return name
    low = name.lower()
    for c in columns:
        if c.lower() == low:
            return c
    return None


def _pair(columns: list[str]) -> tuple[str, str] | None:
    for p, r in PROMPT_RESPONSE_PAIRS:
        pc, rc = _find(columns, p), _find(columns, r)
        if pc is not None and rc is not None:
            return pc, rc
    return None


def detect_format(columns: list[str]) -> str:
    """The format implied by the column names: messages/conversations -> messages; instruction +
    output -> alpaca; a prompt/response-like pair (question/answer, ...) -> prompt-response; text ->
    text. Raises :class:`QloraGaError` when nothing fits."""
    columns = list(columns)
    if any(_find(columns, c) for c in MESSAGES_COLUMNS):
        return "messages"
    if _find(columns, "instruction") and _find(columns, "output"):
        return "alpaca"
    if _pair(columns) is not None:
        return "prompt-response"
    if any(_find(columns, c) for c in TEXT_COLUMNS):
        return "text"
    raise _error(
        f"cannot tell the data format from the columns (found: {', '.join(map(str, columns)) or 'none'}): "
        "set --prompt-column and --response-column, or --format messages --messages-column NAME, "
        "or --format text --text-column NAME"
    )


def _resolve_format(cfg: DataConfig, columns: list[str]) -> str:
    if cfg.format not in FORMATS:
        raise _error(f"unknown data format {cfg.format!r}: use --format with one of {', '.join(FORMATS)}")
    if cfg.format != "auto":
        return cfg.format
    if cfg.prompt_column or cfg.response_column:
        return "prompt-response"
    if cfg.messages_column:
        return "messages"
    if cfg.text_column:
        return "text"
    return detect_format(columns)


def _missing(columns: list[str], what: str, option: str) -> QloraGaError:
    return _error(f"the dataset has no {what} (found: {', '.join(map(str, columns)) or 'none'}): set {option}")


def _columns(cfg: DataConfig, fmt: str, columns: list[str]) -> dict[str, str | None]:
    """Actual column names for ``fmt``; raises naming the columns found and the option to set."""
    columns = list(columns)

    def explicit(name: str | None, option: str) -> str | None:
        if name is None:
            return None
        found = _find(columns, name)
        if found is None:
            raise _missing(columns, f"column {name!r}", f"{option} to one of them")
        return found

    if fmt == "alpaca":
        ins, out = _find(columns, "instruction"), _find(columns, "output")
        if ins is None or out is None:
            raise _missing(columns, "'instruction' and 'output' columns (alpaca format)",
                           "--format prompt-response with --prompt-column and --response-column")
        return {"instruction": ins, "input": _find(columns, "input"), "output": out}
    if fmt == "prompt-response":
        pc = explicit(cfg.prompt_column, "--prompt-column")
        rc = explicit(cfg.response_column, "--response-column")
        if pc is None or rc is None:
            pair = _pair(columns)
            if pair is not None and pc is None and rc is None:
                pc, rc = pair
            else:
                if pc is None:
                    pc = next((c for c in (_find(columns, p) for p, _ in PROMPT_RESPONSE_PAIRS) if c and c != rc), None)
                if rc is None:
                    rc = next((c for c in (_find(columns, r) for _, r in PROMPT_RESPONSE_PAIRS) if c and c != pc), None)
        if pc is None or rc is None:
            raise _missing(columns, "prompt/response columns", "--prompt-column and --response-column")
        return {"prompt": pc, "response": rc}
    one_column = {  # format -> (option value, its flag, the usual column names, what is missing, what to pass)
        "messages": (cfg.messages_column, "--messages-column", MESSAGES_COLUMNS,
                     "'messages' or 'conversations' column", "--messages-column"),
        "text": (cfg.text_column, "--text-column", TEXT_COLUMNS, "'text' column", "--text-column (or pick another --format)"),
    }
    if fmt in one_column:
        given, flag, names, what, hint = one_column[fmt]
        col = explicit(given, flag)
        if col is None:
            col = next((c for c in (_find(columns, n) for n in names) if c), None)
        if col is None:
            raise _missing(columns, what, hint)
        return {fmt: col}
    raise _error(f"unknown data format {fmt!r}: use --format with one of {', '.join(FORMATS)}")


def _str(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value != value:  # NaN from CSV/pandas
        return None
    return value if isinstance(value, str) else str(value)


def _blank(text: str | None) -> bool:
    return text is None or not text.strip()


def _prompt_and_response(record: dict, cfg: DataConfig, fmt: str) -> tuple[str, str | None]:
    cols = _columns(cfg, fmt, list(record))
    if fmt == "alpaca":
        instruction = _str(record.get(cols["instruction"])) or ""
        extra = _str(record.get(cols["input"])) if cols["input"] else None
        prompt = f"{instruction}\n\n{extra}" if not _blank(extra) else instruction
        return prompt, _str(record.get(cols["output"]))
    return _str(record.get(cols["prompt"])) or "", _str(record.get(cols["response"]))


def _messages(record: dict, cfg: DataConfig) -> list[dict]:
    col = _columns(cfg, "messages", list(record))["messages"]
    value = record.get(col)
    if value is None:
        return []
    if isinstance(value, str):  # CSV cells hold JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise _error(f"column {col!r} holds text that is not a JSON list of messages: "
                         "store a list of {role, content} objects (or pick another --format)") from None
    if not isinstance(value, (list, tuple)):
        raise _error(f"column {col!r} must hold a list of {{role, content}} messages, got {type(value).__name__}: "
                     "fix the data or pick another --format")
    out = []
    for m in value:
        if not isinstance(m, dict):
            raise _error(f"column {col!r} must hold a list of {{role, content}} messages, found a "
                         f"{type(m).__name__} item: fix the data or pick another --format")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        if role is None:
            raise _error(f"a message in column {col!r} has no 'role' (keys: {', '.join(m)}): "
                         "use {role, content} or ShareGPT {from, value} messages")
        role = _ROLE_ALIASES.get(str(role).lower(), str(role).lower())
        out.append({"role": role, "content": _str(content) or ""})
    return out
