"""Step 0: data. Loading, formatting, tokenizing with prompt masking, batching.

(The generator of the built-in arithmetic dataset lives here too.)
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .constants import FORMATS, IGNORE_INDEX, OVERLONG
from .errors import QloraGaError

NAMES = ["Ava", "Ben", "Cleo", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jade", "Kai", "Lena", "Milo", "Nora"]
ITEMS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "shells", "cards", "cookies", "stamps"]


def _problem(rng: random.Random) -> dict:
    name, other = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    kind = rng.randrange(4)
    if kind == 0:
        a, b, c = rng.randint(5, 60), rng.randint(2, 40), rng.randint(1, 20)
        c = min(c, a + b)
        q = f"{name} has {a} {item}. {name} buys {b} more and then gives {c} to {other}. How many {item} does {name} have now?"
        s1, s2 = a + b, a + b - c
        ans = f"{name} starts with {a} {item}. After buying {b} more: {a} + {b} = {s1}. After giving {c} away: {s1} - {c} = {s2}.\n#### {s2}"
    elif kind == 1:
        a, b = rng.randint(2, 12), rng.randint(2, 15)
        q = f"{name} packs {a} boxes with {b} {item} in each box. How many {item} are packed in total?"
        ans = f"Each box holds {b} {item} and there are {a} boxes: {a} * {b} = {a * b}.\n#### {a * b}"
    elif kind == 2:
        per, groups = rng.randint(2, 12), rng.randint(2, 10)
        total = per * groups
        q = f"{name} shares {total} {item} equally among {groups} friends. How many {item} does each friend get?"
        ans = f"{total} {item} shared among {groups} friends: {total} / {groups} = {per}.\n#### {per}"
    else:
        a, b, c = rng.randint(2, 9), rng.randint(3, 20), rng.randint(1, 30)
        q = f"{name} buys {a} bags of {item} with {b} {item} in each bag, and already had {c}. How many {item} does {name} have?"
        s1 = a * b
        ans = f"The bags hold {a} * {b} = {s1} {item}. Adding the {c} from before: {s1} + {c} = {s1 + c}.\n#### {s1 + c}"
    return {"question": q, "answer": ans}


def make_arithmetic_examples(n: int = 400, seed: int = 0) -> list[dict]:
    """``n`` deterministic arithmetic word problems with worked answers ending in ``#### <number>``."""
    rng = random.Random(seed)
    return [_problem(rng) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# configuration and results
# ---------------------------------------------------------------------------------------------

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}

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


@dataclass
class DataConfig:
    """Where the examples come from and how they are turned into token ids.

    ``dataset``: None -> the built-in arithmetic set (``make_arithmetic_examples(n_builtin, seed=0)``);
    a local .json/.jsonl/.csv/.parquet file or a folder of such files; or a hub id (``"id"`` or
    ``"id:config"``, e.g. ``"openai/gsm8k:main"``) loaded with ``datasets.load_dataset(id, split=split)``.
    ``eval_split``: a fraction 0<f<1 (float or string like "0.05") of the examples held out by
    ``seed``, or a split name of the same dataset (for a local file: the sibling file of that name,
    e.g. ``train.jsonl`` -> ``test.jsonl``, or a path to a file). ``max_examples`` keeps the first N
    records of the training split (file order, before shuffling and hold-out).
    """

    dataset: str | None = None
    format: str = "auto"
    prompt_column: str | None = None
    response_column: str | None = None
    messages_column: str | None = None
    text_column: str | None = None
    split: str = "train"
    max_length: int = 512
    overlong: str = "truncate"
    eval_split: float | str | None = None
    max_examples: int | None = None
    n_builtin: int = 400
    seed: int = 0
    use_chat_template: bool | None = None


@dataclass
class DataStats:
    """Counts over every record read (training split plus a named eval split, if any).

    ``n_raw``: records read (after ``max_examples``); ``n_empty_dropped``: empty/whitespace/missing
    response or text; ``n_truncated``: kept after cutting to ``max_length``; ``n_overlong_dropped``:
    longer than ``max_length`` with ``overlong="drop"``, or left without label tokens by the cut;
    ``n_train``/``n_eval``: final sizes; ``n_label_tokens``: label tokens (!= -100) in ``train``.
    """

    n_raw: int = 0
    n_empty_dropped: int = 0
    n_truncated: int = 0
    n_overlong_dropped: int = 0
    n_train: int = 0
    n_eval: int = 0
    n_label_tokens: int = 0


@dataclass
class TokenizedData:
    """``train``/``eval``: lists of ``{"input_ids": list[int], "labels": list[int]}`` (-100 on prompt
    tokens). ``eval_records[i]`` is the raw record of ``eval[i]`` (for generation-based evaluation
    with :func:`prompt_text`); ``format`` is the resolved format."""

    train: list[dict]
    eval: list[dict]
    stats: DataStats
    eval_records: list[dict] = field(default_factory=list)
    format: str = ""


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split("\n")).strip()


def _error(msg: str) -> QloraGaError:
    return QloraGaError(_one_line(msg))


def _cause_line(exc: BaseException) -> str:
    """The most specific first line in an exception chain (datasets wraps the pyarrow/json error)."""
    chain, seen = [], set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in reversed(chain):
        text = str(e).strip()
        if text:
            return f"{type(e).__name__}: {text.splitlines()[0].strip()}"
    return type(exc).__name__


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------

def _eval_fraction(cfg: DataConfig) -> float | None:
    """The hold-out fraction if ``eval_split`` is a number, else None; raises on a bad number."""
    v = cfg.eval_split
    if v is None or isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        f = float(v)
    else:
        try:
            f = float(str(v).strip())
        except ValueError:
            return None
    if not 0.0 < f < 1.0:
        raise _error(f"eval_split {v!r} is a number outside (0, 1): pass a fraction like 0.05 or a split name like test")
    return f


def _eval_split_name(cfg: DataConfig) -> str | None:
    v = cfg.eval_split
    if v is None or isinstance(v, (int, float)) or _eval_fraction(cfg) is not None:
        return None
    name = str(v).strip()
    if not name:
        raise _error("eval_split is an empty string: pass a fraction like 0.05, a split name like test, or leave it unset")
    return name


def _check_config(cfg: DataConfig) -> None:
    if cfg.format not in FORMATS:
        raise _error(f"unknown data format {cfg.format!r}: use --format with one of {', '.join(FORMATS)}")
    if cfg.overlong not in OVERLONG:
        raise _error(f"unknown overlong policy {cfg.overlong!r}: use --overlong truncate or --overlong drop")
    if not isinstance(cfg.max_length, int) or cfg.max_length < 2:
        raise _error(f"max_length must be an integer >= 2, got {cfg.max_length!r}: pass e.g. --max-length 512")
    if cfg.max_examples is not None and cfg.max_examples < 1:
        raise _error(f"max_examples must be >= 1, got {cfg.max_examples}: pass a positive number or leave it unset")
    if cfg.dataset is None and cfg.n_builtin < 1:
        raise _error(f"n_builtin must be >= 1, got {cfg.n_builtin}: pass e.g. --n-builtin 400")
    _eval_fraction(cfg)


def _local_path(name: str) -> Path | None:
    """The path if ``name`` names a local file/folder (existing or clearly meant as one), else None."""
    p = Path(name).expanduser()
    if p.exists():
        return p
    if p.suffix.lower() in FILE_BUILDERS or name.startswith(("/", "./", "../", "~", ".\\")) or name.endswith(("/", "\\")):
        return p
    return None


def _load_file(path: Path, what: str = "dataset file") -> list[dict]:
    import datasets

    if not path.exists():
        raise _error(f"{what} not found: {path}; check the path (or pass a hub dataset id)")
    if path.is_dir():
        return _load_dataset_call(str(path), None, "train", what=f"dataset folder {path}")
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise _error(f"unsupported {what} type {path.suffix or '(no extension)'!r} for {path}: "
                     f"use a .json, .jsonl, .csv or .parquet file")
    try:
        if path.stat().st_size == 0 or (builder != "parquet" and not path.read_bytes().strip()):
            raise _error(f"{what} {path} is empty (0 records): put one example per line/row in it")
    except OSError as e:
        raise _error(f"cannot read {what} {path}: {_cause_line(e)}") from None
    try:
        with tempfile.TemporaryDirectory(prefix="qlora_ga_data_") as cache:
            ds = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache)
            records = ds.to_list()
    except QloraGaError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets/pyarrow/json raise many kinds
        line = _cause_line(e)
        if isinstance(e, StopIteration) or "corresponds to no data" in line or "No columns to parse" in line:
            raise _error(f"{what} {path} is empty (0 records): put one example per line/row in it") from None
        hint = {"json": "valid JSON (a list of objects) or JSON Lines (one object per line)",
                "csv": "a CSV file with a header row", "parquet": "a Parquet file"}[builder]
        raise _error(f"could not parse {what} {path} ({line}): check that it is {hint}") from None
    if not records:
        raise _error(f"{what} {path} is empty (0 records): put one example per line/row in it")
    return records


def _load_dataset_call(name: str, config: str | None, split: str, what: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001
        offline = " (offline mode is on: use a dataset already in the cache or a local file)" if (
            os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1") else ""
        raise _error(f"could not load {what} split {split!r} ({_cause_line(e)}): check the id, the split name "
                     f"and the config (write 'id:config'){offline}") from None
    records = ds.to_list()
    if not records:
        raise _error(f"{what} split {split!r} is empty (0 records): pick another split or dataset")
    return records


def _split_hub_id(name: str) -> tuple[str, str | None]:
    if ":" in name and "://" not in name:
        repo, config = name.rsplit(":", 1)
        return repo, (config or None)
    return name, None


def load_records(cfg: DataConfig) -> tuple[list[dict], list[dict] | None]:
    """Raw training records (first ``max_examples`` if set) and the raw records of the eval split
    when ``eval_split`` is a split name (None otherwise)."""
    _check_config(cfg)
    split_name = _eval_split_name(cfg)
    eval_records = None
    if cfg.dataset is None:
        if split_name is not None:
            raise _error(f"the built-in dataset has no split {split_name!r}: pass a fraction such as --eval-split 0.1")
        train = make_arithmetic_examples(cfg.n_builtin, seed=0)
    elif (path := _local_path(cfg.dataset)) is not None:
        train = _load_file(path)
        if split_name is not None:
            if path.is_dir():
                eval_records = _load_dataset_call(str(path), None, split_name, what=f"dataset folder {path}")
            else:
                as_path = Path(split_name).expanduser()
                sibling = path.with_name(split_name + path.suffix)
                if as_path.suffix.lower() in FILE_BUILDERS and as_path.exists():
                    eval_records = _load_file(as_path, what="eval file")
                elif sibling.exists():
                    eval_records = _load_file(sibling, what="eval file")
                else:
                    raise _error(f"eval split {split_name!r}: no file {sibling} next to {path}; pass a fraction "
                                 f"(--eval-split 0.1) or the path of an eval file")
    else:
        repo, config = _split_hub_id(cfg.dataset)
        train = _load_dataset_call(repo, config, cfg.split, what=f"dataset {cfg.dataset!r}")
        if split_name is not None:
            eval_records = _load_dataset_call(repo, config, split_name, what=f"dataset {cfg.dataset!r}")
    if cfg.max_examples is not None:
        train = train[: cfg.max_examples]
    return train, eval_records


# ---------------------------------------------------------------------------------------------
# formats and columns
# ---------------------------------------------------------------------------------------------

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
    if fmt == "messages":
        mc = explicit(cfg.messages_column, "--messages-column")
        if mc is None:
            mc = next((c for c in (_find(columns, m) for m in MESSAGES_COLUMNS) if c), None)
        if mc is None:
            raise _missing(columns, "'messages' or 'conversations' column", "--messages-column")
        return {"messages": mc}
    if fmt == "text":
        tc = explicit(cfg.text_column, "--text-column")
        if tc is None:
            tc = next((c for c in (_find(columns, t) for t in TEXT_COLUMNS) if c), None)
        if tc is None:
            raise _missing(columns, "'text' column", "--text-column (or pick another --format)")
        return {"text": tc}
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


# ---------------------------------------------------------------------------------------------
# tokenizing
# ---------------------------------------------------------------------------------------------

def _use_template(tokenizer, cfg: DataConfig) -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    if cfg.use_chat_template is None:
        return has
    if cfg.use_chat_template and not has:
        raise _error("use_chat_template is on but the tokenizer has no chat template: leave it unset or use a "
                     "model whose tokenizer has one")
    return bool(cfg.use_chat_template)


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    try:
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    except Exception as e:  # noqa: BLE001 - jinja raises for e.g. non-alternating roles
        raise _error(f"the tokenizer's chat template rejected a conversation ({_cause_line(e)}): fix the data "
                     "or pass use_chat_template=False") from None
    if isinstance(out, list):  # some versions return a batch
        out = out[0]
    return out


def _ids(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with no special tokens added (special-token strings in it still map)."""
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _bos_prefix(tokenizer) -> list[int]:
    """``[bos]`` if the tokenizer adds a BOS token by default (Llama, Mistral, ...), else ``[]``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    if with_special and with_special[0] == bos and (not without or without[0] != bos):
        return [bos]
    return []


def _prompt_string(prompt: str, tokenizer, templated: bool) -> str:
    if templated:
        return _render(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)
    return prompt + "\n"


def _plain_turn(message: dict) -> str:
    return f"{message['role']}: {message['content']}\n"


def _last_assistant(messages: list[dict]) -> int | None:
    idx = [i for i, m in enumerate(messages) if m["role"] == "assistant" and not _blank(m["content"])]
    return idx[-1] if idx else None


def prompt_text(record: dict, tokenizer, cfg: DataConfig, fmt: str) -> str:
    """The prompt exactly as the model sees it at training time (everything before the response).

    alpaca/prompt-response: the chat-templated user turn with the generation prompt, or the prompt
    + "\\n" without a template; messages: the conversation before the last assistant turn, with the
    generation prompt; text: "" (plain text has no prompt). Tokenize it with
    ``add_special_tokens=False`` when a chat template is used (it already holds any BOS), or use
    :func:`prompt_ids` to get the exact training-time ids.
    """
    if fmt == "auto":
        fmt = _resolve_format(cfg, list(record))
    templated = _use_template(tokenizer, cfg)
    if fmt in ("alpaca", "prompt-response"):
        return _prompt_string(_prompt_and_response(record, cfg, fmt)[0], tokenizer, templated)
    if fmt == "messages":
        msgs = _messages(record, cfg)
        last = _last_assistant(msgs)
        context = msgs if last is None else msgs[:last]
        if templated:
            return _render(tokenizer, context, add_generation_prompt=True)
        return "".join(_plain_turn(m) for m in context) + "assistant: "
    if fmt == "text":
        _columns(cfg, fmt, list(record))
        return ""
    raise _error(f"unknown data format {fmt!r}: use --format with one of {', '.join(FORMATS)}")


def prompt_ids(record: dict, tokenizer, cfg: DataConfig, fmt: str) -> list[int]:
    """The token ids of :func:`prompt_text` exactly as at training time (BOS included where used)."""
    text = prompt_text(record, tokenizer, cfg, fmt)
    if fmt == "auto":
        fmt = _resolve_format(cfg, list(record))
    templated = _use_template(tokenizer, cfg)
    if templated and fmt != "text":
        return _ids(tokenizer, text)
    return _bos_prefix(tokenizer) + _ids(tokenizer, text)


def _append_eos(ids: list[int], labels: list[int], tokenizer) -> None:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
        labels.append(eos)


def _tokenize_messages(msgs: list[dict], tokenizer, cfg: DataConfig) -> dict | None:
    last = _last_assistant(msgs)
    if last is None:
        return None
    msgs = msgs[: last + 1]  # turns after the last assistant answer carry no loss
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    labels: list[int] = []
    if not _use_template(tokenizer, cfg):
        ids += _bos_prefix(tokenizer)
        labels += [IGNORE_INDEX] * len(ids)
        for i, m in enumerate(msgs):
            if m["role"] == "assistant":
                head = _ids(tokenizer, "assistant: ")
                body = _ids(tokenizer, m["content"])
                if eos is not None:
                    body.append(eos)
                ids += head + body
                labels += [IGNORE_INDEX] * len(head) + body
                if i < len(msgs) - 1:
                    nl = _ids(tokenizer, "\n")
                    ids += nl
                    labels += [IGNORE_INDEX] * len(nl)
            else:
                seg = _ids(tokenizer, _plain_turn(m))
                ids += seg
                labels += [IGNORE_INDEX] * len(seg)
        return {"input_ids": ids, "labels": labels}

    # Chat template: render growing prefixes; the text each assistant turn adds is labelled
    # (content + end-of-turn), the rest (system/user turns, assistant headers) is not.
    prev = ""
    consistent = True
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        try:
            gen = _render(tokenizer, msgs[:i], add_generation_prompt=True)
        except QloraGaError:
            gen = None
        full = _render(tokenizer, msgs[: i + 1], add_generation_prompt=False)
        if gen is None or not gen.startswith(prev) or not full.startswith(gen):
            consistent = False
            break
        ctx = _ids(tokenizer, gen[len(prev):])
        ids += ctx
        labels += [IGNORE_INDEX] * len(ctx)
        ans = _ids(tokenizer, full[len(gen):])
        cut = len(ans)
        if eos is not None and eos in ans:  # template glue after the end-of-turn token is not learned
            cut = len(ans) - ans[::-1].index(eos)
        ids += ans
        labels += ans[:cut] + [IGNORE_INDEX] * (len(ans) - cut)
        prev = full
    if not consistent:
        # The template re-renders earlier turns differently (e.g. strips reasoning): learn only the
        # last assistant turn after the templated context.
        try:
            ctx = _ids(tokenizer, _render(tokenizer, msgs[:last], add_generation_prompt=True))
        except QloraGaError:
            if last:
                raise
            ctx = []  # a conversation that opens with the assistant turn
        ans = _ids(tokenizer, msgs[last]["content"])
        ids, labels = ctx + ans, [IGNORE_INDEX] * len(ctx) + ans
    while labels and labels[-1] == IGNORE_INDEX:  # drop trailing template glue ("\n" after <|im_end|>)
        labels.pop()
        ids.pop()
    return {"input_ids": ids, "labels": labels}


def tokenize_example(record: dict, tokenizer, cfg: DataConfig, fmt: str) -> dict | None:
    """``{"input_ids", "labels"}`` for one record (labels -100 on prompt tokens, EOS appended as a
    label token unless already last), or None for an empty example (empty/whitespace/missing
    response or text; a conversation without a non-empty assistant turn). Not cut to
    ``cfg.max_length``: :func:`build_data` applies the length limit. ``fmt`` may be "auto"."""
    if fmt == "auto":
        fmt = _resolve_format(cfg, list(record))
    if fmt in ("alpaca", "prompt-response"):
        prompt, response = _prompt_and_response(record, cfg, fmt)
        if _blank(response):
            return None
        p_ids = prompt_ids(record, tokenizer, cfg, fmt)
        r_ids = _ids(tokenizer, response)
        ids = p_ids + r_ids
        labels = [IGNORE_INDEX] * len(p_ids) + list(r_ids)
    elif fmt == "messages":
        out = _tokenize_messages(_messages(record, cfg), tokenizer, cfg)
        if out is None:
            return None
        ids, labels = out["input_ids"], out["labels"]
    elif fmt == "text":
        text = _str(record.get(_columns(cfg, fmt, list(record))["text"]))
        if _blank(text):
            return None
        bos = _bos_prefix(tokenizer)
        body = _ids(tokenizer, text)
        ids = bos + body
        labels = [IGNORE_INDEX] * len(bos) + body
    else:
        raise _error(f"unknown data format {fmt!r}: use --format with one of {', '.join(FORMATS)}")
    _append_eos(ids, labels, tokenizer)
    if not any(label != IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": ids, "labels": labels}


def _fit(example: dict, cfg: DataConfig) -> tuple[dict | None, str]:
    """Apply the length limit: (example, "ok" | "truncated") or (None, "dropped")."""
    n = len(example["input_ids"])
    if n <= cfg.max_length:
        return example, "ok"
    if cfg.overlong == "drop":
        return None, "dropped"
    ids, labels = example["input_ids"][: cfg.max_length], example["labels"][: cfg.max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None, "dropped"
    return {"input_ids": ids, "labels": labels}, "truncated"


def _process(records: list[dict], tokenizer, cfg: DataConfig, fmt: str, stats: DataStats):
    """Tokenized examples and their records, with the counts added to ``stats``; also the local counts."""
    examples, kept = [], []
    n_empty = n_over = 0
    for rec in records:
        ex = tokenize_example(rec, tokenizer, cfg, fmt)
        if ex is None:
            n_empty += 1
            continue
        ex, status = _fit(ex, cfg)
        if ex is None:
            n_over += 1
            continue
        stats.n_truncated += status == "truncated"
        examples.append(ex)
        kept.append(rec)
    stats.n_raw += len(records)
    stats.n_empty_dropped += n_empty
    stats.n_overlong_dropped += n_over
    return examples, kept, n_empty, n_over


def _nothing_left(what: str, n: int, n_empty: int, n_over: int, cfg: DataConfig) -> QloraGaError:
    if n_over and n_over + n_empty == n:
        if cfg.overlong == "drop":
            return _error(f"every {what} example is longer than --max-length {cfg.max_length} tokens "
                          f"({n_over} dropped, {n_empty} empty): raise --max-length or use --overlong truncate")
        return _error(f"every {what} example's prompt fills --max-length {cfg.max_length} tokens, leaving no "
                      f"response tokens to learn ({n_over} dropped, {n_empty} empty): raise --max-length")
    return _error(f"no {what} examples left: all {n} records are empty (no response/text); check the "
                  "--format and the --prompt-column/--response-column/--text-column options")


def build_data(tokenizer, cfg: DataConfig) -> TokenizedData:
    """Load, format, tokenize (prompt-masked), cut to ``max_length``, shuffle by ``seed`` and split."""
    train_records, eval_records = load_records(cfg)
    columns = list(dict.fromkeys(k for r in train_records[:100] for k in r))
    fmt = _resolve_format(cfg, columns)
    _columns(cfg, fmt, columns)  # fail early with the columns found
    stats = DataStats()
    examples, records, n_empty, n_over = _process(train_records, tokenizer, cfg, fmt, stats)
    if not examples:
        raise _nothing_left("training", len(train_records), n_empty, n_over, cfg)
    order = list(range(len(examples)))
    random.Random(cfg.seed).shuffle(order)
    eval_examples: list[dict] = []
    eval_kept: list[dict] = []
    frac = _eval_fraction(cfg)
    if frac is not None:
        n_eval = max(1, round(frac * len(order)))
        if n_eval >= len(order):
            raise _error(f"eval_split {cfg.eval_split} leaves no training examples out of {len(order)}: "
                         "use a smaller fraction or more data")
        eval_examples = [examples[i] for i in order[:n_eval]]
        eval_kept = [records[i] for i in order[:n_eval]]
        order = order[n_eval:]
    elif eval_records is not None:
        eval_examples, eval_kept, e_empty, e_over = _process(eval_records, tokenizer, cfg, fmt, stats)
        if not eval_examples:
            raise _nothing_left(f"eval ({cfg.eval_split})", len(eval_records), e_empty, e_over, cfg)
    train = [examples[i] for i in order]
    stats.n_train = len(train)
    stats.n_eval = len(eval_examples)
    stats.n_label_tokens = sum(sum(1 for t in ex["labels"] if t != IGNORE_INDEX) for ex in train)
    return TokenizedData(train=train, eval=eval_examples, stats=stats, eval_records=eval_kept, format=fmt)


# ---------------------------------------------------------------------------------------------
# batching
# ---------------------------------------------------------------------------------------------

def count_label_tokens(labels: torch.Tensor) -> int:
    """Label tokens of a collated batch that get a loss in a causal LM (position t predicts labels[:, t+1])."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def collate(examples: list[dict], pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example (rounded up to ``pad_to_multiple_of``): ``input_ids`` (pad
    id), ``attention_mask`` (0 on pad), ``labels`` (-100 on pad); all int64 ``[batch, length]``.

    An example may carry its own ``attention_mask`` (0 = padding already inside it): it is kept,
    and those positions get no loss either."""
    if not examples:
        raise ValueError("collate() needs at least one example")
    if pad_token_id is None:
        raise ValueError("collate() needs a pad_token_id (use the tokenizer's pad or eos token id)")
    length = max(len(ex["input_ids"]) for ex in examples)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(examples), length), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        input_ids[row, :n] = torch.as_tensor(ex["input_ids"], dtype=torch.long)
        mask = torch.as_tensor(ex["attention_mask"], dtype=torch.long) if "attention_mask" in ex else 1
        attention_mask[row, :n] = mask
        labels[row, :n] = torch.as_tensor(ex["labels"], dtype=torch.long).masked_fill(attention_mask[row, :n] == 0, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def sample_batch(examples: list[dict], n: int, seed: int) -> list[dict]:
    """The gradient-pass sample: ``n`` examples drawn without replacement by ``seed`` (all, in
    their order, if ``n >= len(examples)``)."""
    if n >= len(examples):
        return list(examples)
    if n < 0:
        raise ValueError(f"sample_batch() needs n >= 0, got {n}")
    return random.Random(seed).sample(list(examples), n)
