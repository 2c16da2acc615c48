"""The Ollama ``Modelfile`` written beside a GGUF export (docs/DESIGN.md section 6).

The Modelfile's ``TEMPLATE`` is Ollama's Go-template form of the tokenizer's Jinja chat template,
written only when the Jinja template is recognised as one of the layouts in :data:`CHAT_FORMATS`
(ChatML, Llama-3): the tokenizer's own template is rendered on probe conversations and must
produce exactly what the layout produces (a default system prompt the template inserts becomes
``SYSTEM``). Any other template gets no ``TEMPLATE`` line and a warning comment instead of a wrong
one. ``PARAMETER stop`` lists the layout's end-of-turn marker and the model's end-of-sequence tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ChatFormat:
    """A chat layout: ``turn`` is one message with ``{role}``/``{content}``, ``generation`` opens the assistant's reply."""

    name: str
    turn: str
    generation: str
    stop: str
    go_template: str  # the same layout in Ollama's Go template syntax

    def render(self, messages: list[dict]) -> str:
        return "".join(self.turn.format(role=m["role"], content=m["content"]) for m in messages) + self.generation


CHAT_FORMATS = (
    ChatFormat(
        "chatml", "<|im_start|>{role}\n{content}<|im_end|>\n", "<|im_start|>assistant\n", "<|im_end|>",
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
    ),
    ChatFormat(
        "llama3", "<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>",
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
)

_PROBE = [
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "12 + 30 = 42."},
    {"role": "user", "content": "And 42 - 2?"},
]
_PROBE_SYSTEM = [{"role": "system", "content": "You answer in one line."}] + _PROBE


@dataclass
class OllamaChat:
    """What the Modelfile says about chatting: a recognised layout (or None), a default system prompt, stop strings."""

    format: str | None
    template: str | None
    system: str | None
    stops: list[str]
    note: str | None = None  # why no TEMPLATE was written


def _render(tokenizer, messages) -> str | None:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template may raise on any probe (e.g. 'system role not supported')
        return None
    return text if isinstance(text, str) else None


def _variants(text: str | None, bos: str | None) -> list[str]:
    """``text`` and, when it starts with the BOS token, ``text`` without it: llama.cpp adds BOS itself when the
    GGUF says so, and Ollama templates leave it out."""
    if text is None:
        return []
    return [text] + ([text[len(bos):]] if bos and text.startswith(bos) else [])


def _default_system(fmt: ChatFormat, rendered: str) -> str | None:
    """The system prompt a template inserts on its own when the conversation has none."""
    pre, post = fmt.turn.split("{content}")
    pre = pre.format(role="system")
    if not rendered.startswith(pre) or post not in rendered[len(pre):]:
        return None
    return rendered[len(pre):].split(post, 1)[0]


def ollama_chat(tokenizer, eos_token_ids=None) -> OllamaChat:
    """Recognise the tokenizer's chat template as one of :data:`CHAT_FORMATS` by rendering probe conversations.

    ``eos_token_ids``: the generation config's ``eos_token_id`` (an id or a list), stop tokens too.
    """
    stops = _eos_strings(tokenizer, eos_token_ids)
    if not getattr(tokenizer, "chat_template", None):
        return OllamaChat(None, None, None, stops, "the tokenizer has no chat template (a plain completion model)")
    bos = tokenizer.bos_token
    with_system = _variants(_render(tokenizer, _PROBE_SYSTEM), bos)
    without = _variants(_render(tokenizer, _PROBE), bos)
    for fmt in CHAT_FORMATS:
        if fmt.render(_PROBE_SYSTEM) not in with_system:
            continue
        system = None
        if fmt.render(_PROBE) not in without:
            found = [d for d in (_default_system(fmt, w) for w in without) if d is not None
                     and fmt.render([{"role": "system", "content": d}] + _PROBE) in without]
            if not found:
                continue
            system = found[0]
        if system and '"""' in system:
            continue
        return OllamaChat(fmt.name, fmt.go_template, system, _dedupe([fmt.stop] + stops))
    return OllamaChat(
        None, None, None, stops,
        "the tokenizer's chat template is not one qlora-ga translates to Ollama's Go template syntax "
        f"({', '.join(f.name for f in CHAT_FORMATS)})",
    )


def _dedupe(items):
    return list(dict.fromkeys(i for i in items if i))


def _eos_strings(tokenizer, eos_token_ids=None) -> list[str]:
    ids = [] if eos_token_ids is None else [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids)
    tokens = [tokenizer.eos_token] + [tokenizer.convert_ids_to_tokens(int(i)) for i in ids]
    return _dedupe(tokens)


def _quote(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def modelfile_text(gguf_name: str, chat: OllamaChat) -> str:
    """An Ollama Modelfile: FROM the GGUF beside it, TEMPLATE/SYSTEM when the chat layout is known, PARAMETER stop."""
    lines = [
        f"# Ollama Modelfile written by qlora-ga for {gguf_name}.",
        "#   ollama create my-model -f Modelfile && ollama run my-model",
        f"FROM ./{gguf_name}",
    ]
    if chat.template is not None:
        lines.append(f"# chat template: {chat.format} layout, checked against the tokenizer's Jinja template")
        lines.append(f'TEMPLATE """{chat.template}"""')
        if chat.system:
            lines.append(f'SYSTEM """{chat.system}"""')
    else:
        lines.append(f"# WARNING: no TEMPLATE: {chat.note}. Ollama then uses the chat template stored in the GGUF if it")
        lines.append("# recognises it; otherwise add a TEMPLATE by hand (Ollama docs: docs/template.md).")
    lines += [f"PARAMETER stop {_quote(s)}" for s in chat.stops]
    return "\n".join(lines) + "\n"


def model_chat(model_dir: Path) -> OllamaChat:
    """:func:`ollama_chat` of a saved model folder (its tokenizer and generation config)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    gen = Path(model_dir) / "generation_config.json"
    eos = json.loads(gen.read_text()).get("eos_token_id") if gen.is_file() else None
    return ollama_chat(tok, eos)
