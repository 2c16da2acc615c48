"""Data, step 3: one record -> ``{"input_ids", "labels"}`` with the prompt masked from the loss.

The prompt is the tokenizer's chat template applied to the user turn(s) with the generation prompt
(or ``prompt + "\\n"`` without a template, after any BOS); ``messages`` trains on every assistant
turn. Labels are :data:`~qlora_ga.constants.IGNORE_INDEX` on prompt tokens; EOS is appended as a
label token. :func:`_fit` applies ``max_length`` (truncate, or drop with ``overlong="drop"``).
"""

from __future__ import annotations

from ..constants import FORMATS, IGNORE_INDEX
from ..errors import QloraGaError
from .config import DataConfig, _cause_line, _error
from .formats import _blank, _columns, _messages, _prompt_and_response, _resolve_format, _str


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


def _plain_messages(msgs: list[dict], tokenizer, eos: int | None) -> dict:
    """Without a chat template: ``role: content`` lines after any BOS; each assistant turn's content
    and EOS are labelled, its ``assistant: `` head and every other turn are not."""
    ids = _bos_prefix(tokenizer)
    labels = [IGNORE_INDEX] * len(ids)
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


def _tokenize_messages(msgs: list[dict], tokenizer, cfg: DataConfig) -> dict | None:
    last = _last_assistant(msgs)
    if last is None:
        return None
    msgs = msgs[: last + 1]  # turns after the last assistant answer carry no loss
    eos = getattr(tokenizer, "eos_token_id", None)
    if not _use_template(tokenizer, cfg):
        return _plain_messages(msgs, tokenizer, eos)
    ids: list[int] = []
    labels: list[int] = []

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
