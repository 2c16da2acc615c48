"""Step 0 (data): loading, format detection, prompt masking, length limits, splits, batching, errors."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from qlora_ga.data import (
    DataConfig,
    build_data,
    collate,
    detect_format,
    load_records,
    prompt_ids,
    prompt_text,
    sample_batch,
    tokenize_example,
)
from qlora_ga.errors import QloraGaError
from qlora_ga.testing import make_tiny_tokenizer

GSM8K = Path("/work/shared/data/gsm8k/train.jsonl")


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def qa_rows(n, prefix="q"):
    return [{"question": f"{prefix} {i}: what is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}.\n#### {2 * i}"}
            for i in range(n)]


def label_ids(ex):
    return [t for t in ex["labels"] if t != -100]


def n_prompt(ex):
    """Number of leading -100 labels; asserts every label after them is a real label token."""
    k = 0
    while k < len(ex["labels"]) and ex["labels"][k] == -100:
        k += 1
    assert ex["labels"][k:] == ex["input_ids"][k:]
    return k


def raises_one_line(match, fn, *args, **kw):
    with pytest.raises(QloraGaError, match=match) as info:
        fn(*args, **kw)
    msg = str(info.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    return msg


# --------------------------------------------------------------------------- format detection


@pytest.mark.parametrize(
    "columns, fmt",
    [
        (["question", "answer"], "prompt-response"),
        (["prompt", "response"], "prompt-response"),
        (["Query", "Response"], "prompt-response"),
        (["input", "output"], "prompt-response"),
        (["instruction", "input", "output"], "alpaca"),
        (["instruction", "output"], "alpaca"),
        (["messages"], "messages"),
        (["id", "conversations"], "messages"),
        (["text", "meta"], "text"),
    ],
)
def test_detect_format(columns, fmt):
    assert detect_format(columns) == fmt


def test_detect_format_unknown_columns_names_them_and_the_options():
    msg = raises_one_line("cannot tell the data format", detect_format, ["foo", "bar"])
    assert "foo, bar" in msg and "--prompt-column" in msg and "--response-column" in msg


# --------------------------------------------------------------------------- formats and masking


def test_prompt_response_auto_detect_and_exact_masking(tok, tmp_path):
    rows = qa_rows(6)
    f = write_jsonl(tmp_path / "qa.jsonl", rows)
    cfg = DataConfig(dataset=str(f))
    data = build_data(tok, cfg)
    assert data.format == "prompt-response"
    assert len(data.train) == 6 and data.eval == []
    by_answer = {tok.decode(label_ids(ex)): ex for ex in data.train}
    for r in rows:
        ex = by_answer[r["answer"] + tok.eos_token]  # decode(label tokens) == response + eos
        k = n_prompt(ex)
        # the prompt part is exactly the chat-templated user turn with the generation prompt
        expected_prompt = tok.apply_chat_template(
            [{"role": "user", "content": r["question"]}], add_generation_prompt=True, tokenize=False)
        assert prompt_text(r, tok, cfg, "prompt-response") == expected_prompt
        assert ex["input_ids"][:k] == tok(expected_prompt, add_special_tokens=False)["input_ids"]
        assert ex["input_ids"][:k] == prompt_ids(r, tok, cfg, "auto")
        assert ex["input_ids"][k:] == tok(r["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert ex["input_ids"][-1] == tok.eos_token_id
    assert data.stats.n_label_tokens == sum(len(label_ids(ex)) for ex in data.train)
    assert data.stats.n_raw == 6 and data.stats.n_train == 6


def test_explicit_columns_and_no_chat_template(tok, tmp_path):
    rows = [{"src": "Say hi", "tgt": "hi there", "other": 1}]
    f = write_jsonl(tmp_path / "x.jsonl", rows)
    cfg = DataConfig(dataset=str(f), prompt_column="src", response_column="tgt", use_chat_template=False)
    data = build_data(tok, cfg)
    assert data.format == "prompt-response"
    ex = data.train[0]
    k = n_prompt(ex)
    assert prompt_text(rows[0], tok, cfg, "prompt-response") == "Say hi\n"
    assert tok.decode(ex["input_ids"][:k]) == "Say hi\n"
    assert tok.decode(label_ids(ex)) == "hi there" + tok.eos_token


def test_alpaca_with_and_without_input(tok, tmp_path):
    rows = [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Name a fruit.", "input": "", "output": "apples"},
    ]
    f = tmp_path / "alpaca.json"
    f.write_text(json.dumps(rows), encoding="utf-8")  # a JSON list, not JSON Lines
    cfg = DataConfig(dataset=str(f))
    recs, ev = load_records(cfg)
    assert recs == rows and ev is None
    ex0 = tokenize_example(rows[0], tok, cfg, "auto")
    assert "Add the numbers.\n\n2 and 3" in prompt_text(rows[0], tok, cfg, "alpaca")
    assert tok.decode(ex0["input_ids"][: n_prompt(ex0)]) == prompt_text(rows[0], tok, cfg, "alpaca")
    assert tok.decode(label_ids(ex0)) == "5" + tok.eos_token
    p1 = prompt_text(rows[1], tok, cfg, "alpaca")
    assert "Name a fruit.<|im_end|>" in p1 and "\n\n" not in p1
    assert build_data(tok, cfg).format == "alpaca"


def test_messages_loss_only_on_assistant_turns(tok, tmp_path):
    conv = [
        {"role": "system", "content": "You count."},
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "three"},
        {"role": "assistant", "content": "four"},
    ]
    f = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conv}])
    cfg = DataConfig(dataset=str(f))
    data = build_data(tok, cfg)
    assert data.format == "messages"
    ex = data.train[0]
    full = tok.apply_chat_template(conv, tokenize=False)
    assert tok.decode(ex["input_ids"]) == full.rstrip("\n")  # whole conversation, trailing glue cut
    assert tok.decode(label_ids(ex)) == "two<|im_end|>four<|im_end|>"
    assert ex["input_ids"][-1] == tok.eos_token_id and ex["labels"][-1] == tok.eos_token_id
    # masked positions are exactly the non-assistant text
    masked = tok.decode([t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab == -100])
    assert "one" in masked and "three" in masked and "You count." in masked
    assert "two" not in masked and "four" not in masked
    assert prompt_text({"messages": conv}, tok, cfg, "messages") == tok.apply_chat_template(
        conv[:4], add_generation_prompt=True, tokenize=False)


def test_sharegpt_conversations_auto_detect(tok, tmp_path):
    conv = [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hi"}]
    f = write_jsonl(tmp_path / "sg.jsonl", [{"conversations": conv}])
    data = build_data(tok, DataConfig(dataset=str(f)))
    assert data.format == "messages"
    assert tok.decode(label_ids(data.train[0])) == "hi<|im_end|>"


def test_text_format_loss_on_all_tokens_from_csv(tok, tmp_path):
    f = tmp_path / "t.csv"
    f.write_text('text\n"Ava has 3 apples."\n"Ben has 4 books."\n', encoding="utf-8")
    data = build_data(tok, DataConfig(dataset=str(f)))
    assert data.format == "text"
    decoded = sorted(tok.decode(label_ids(ex)) for ex in data.train)
    assert decoded == ["Ava has 3 apples." + tok.eos_token, "Ben has 4 books." + tok.eos_token]
    for ex in data.train:
        assert ex["labels"] == ex["input_ids"]


def test_parquet_file(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["a?", "b?"], "completion": ["yes", "no"]}), f)
    data = build_data(tok, DataConfig(dataset=str(f)))
    assert data.format == "prompt-response"
    assert sorted(tok.decode(label_ids(ex)) for ex in data.train) == ["no<|im_end|>", "yes<|im_end|>"]


def test_builtin_default_dataset(tok):
    data = build_data(tok, DataConfig(n_builtin=12))
    assert data.format == "prompt-response" and len(data.train) == 12
    assert all(tok.decode(label_ids(ex)).rstrip(tok.eos_token).split("#### ")[-1].isdigit() for ex in data.train)


# --------------------------------------------------------------------------- EOS, length, empties


def test_eos_appended_once(tok):
    cfg = DataConfig()
    ex = tokenize_example({"question": "q", "answer": "a"}, tok, cfg, "prompt-response")
    assert ex["input_ids"][-1] == tok.eos_token_id and ex["input_ids"][-2] != tok.eos_token_id
    ex2 = tokenize_example({"question": "q", "answer": "a" + tok.eos_token}, tok, cfg, "prompt-response")
    assert ex2["input_ids"] == ex["input_ids"]  # already ends with EOS: not doubled


def test_truncate_vs_drop(tok, tmp_path):
    rows = [{"question": "short?", "answer": "ok"}, {"question": "long?", "answer": "word " * 60}]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    full = tokenize_example(rows[1], tok, DataConfig(), "prompt-response")
    short = tokenize_example(rows[0], tok, DataConfig(), "prompt-response")
    limit = len(short["input_ids"]) + 5
    assert len(full["input_ids"]) > limit

    t = build_data(tok, DataConfig(dataset=str(f), max_length=limit, overlong="truncate"))
    assert t.stats.n_truncated == 1 and t.stats.n_overlong_dropped == 0 and t.stats.n_train == 2
    assert max(len(ex["input_ids"]) for ex in t.train) == limit
    cut = next(ex for ex in t.train if len(ex["input_ids"]) == limit)
    assert cut["input_ids"] == full["input_ids"][:limit] and cut["labels"] == full["labels"][:limit]

    d = build_data(tok, DataConfig(dataset=str(f), max_length=limit, overlong="drop"))
    assert d.stats.n_truncated == 0 and d.stats.n_overlong_dropped == 1 and d.stats.n_train == 1
    assert d.train[0]["input_ids"] == short["input_ids"]


def test_truncation_leaving_no_labels_is_dropped(tok, tmp_path):
    rows = [{"question": "word " * 60, "answer": "ok"}, {"question": "hi", "answer": "ok"}]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    limit = len(tokenize_example(rows[1], tok, DataConfig(), "prompt-response")["input_ids"])
    data = build_data(tok, DataConfig(dataset=str(f), max_length=limit, overlong="truncate"))
    assert data.stats.n_overlong_dropped == 1 and data.stats.n_truncated == 0 and data.stats.n_train == 1


def test_empty_examples_dropped_and_counted(tok, tmp_path):
    rows = qa_rows(3) + [
        {"question": "a", "answer": ""},
        {"question": "b", "answer": "   \n"},
        {"question": "c", "answer": None},
    ]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    data = build_data(tok, DataConfig(dataset=str(f)))
    assert data.stats.n_raw == 6 and data.stats.n_empty_dropped == 3 and data.stats.n_train == 3
    assert tokenize_example({"text": "  "}, tok, DataConfig(), "text") is None
    assert tokenize_example({"messages": [{"role": "user", "content": "x"}]}, tok, DataConfig(), "messages") is None


# --------------------------------------------------------------------------- order and splits


def test_shuffle_is_deterministic_by_seed(tok, tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", qa_rows(30))
    a = build_data(tok, DataConfig(dataset=str(f), seed=1)).train
    b = build_data(tok, DataConfig(dataset=str(f), seed=1)).train
    c = build_data(tok, DataConfig(dataset=str(f), seed=2)).train
    assert a == b
    assert a != c
    assert sorted(map(str, a)) == sorted(map(str, c))  # same examples, other order
    in_file_order = [tokenize_example(r, tok, DataConfig(), "prompt-response") for r in qa_rows(30)]
    assert a != in_file_order


def test_eval_fraction_split(tok, tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", qa_rows(40))
    data = build_data(tok, DataConfig(dataset=str(f), eval_split=0.25, seed=3))
    assert (len(data.train), len(data.eval)) == (30, 10)
    assert (data.stats.n_train, data.stats.n_eval) == (30, 10)
    assert not {str(e) for e in data.eval} & {str(e) for e in data.train}
    # eval_records line up with eval examples
    for rec, ex in zip(data.eval_records, data.eval):
        assert tokenize_example(rec, tok, DataConfig(), "prompt-response") == ex
    again = build_data(tok, DataConfig(dataset=str(f), eval_split="0.25", seed=3))
    assert again.eval == data.eval and again.train == data.train
    other = build_data(tok, DataConfig(dataset=str(f), eval_split=0.25, seed=4))
    assert other.eval != data.eval


def test_eval_split_name_uses_sibling_file(tok, tmp_path):
    f = write_jsonl(tmp_path / "train.jsonl", qa_rows(5))
    write_jsonl(tmp_path / "test.jsonl", qa_rows(3, prefix="t"))
    train, ev = load_records(DataConfig(dataset=str(f), eval_split="test"))
    assert len(train) == 5 and [r["question"][:3] for r in ev] == ["t 0", "t 1", "t 2"]
    data = build_data(tok, DataConfig(dataset=str(f), eval_split="test"))
    assert (len(data.train), len(data.eval)) == (5, 3) and data.stats.n_raw == 8
    raises_one_line("no file", load_records, DataConfig(dataset=str(f), eval_split="validation"))


def test_max_examples(tok, tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", qa_rows(10))
    recs, _ = load_records(DataConfig(dataset=str(f), max_examples=4))
    assert recs == qa_rows(4)


# --------------------------------------------------------------------------- batching


def test_collate_right_pads():
    exs = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    b = collate(exs, pad_token_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in b.values())
    b8 = collate(exs, pad_token_id=9, pad_to_multiple_of=8)
    assert b8["input_ids"].shape == (2, 8)
    assert b8["input_ids"][1].tolist() == [8] + [9] * 7 and b8["attention_mask"].sum().item() == 4
    assert (b8["labels"][:, 3:] == -100).all()


def test_sample_batch_deterministic():
    exs = [{"input_ids": [i], "labels": [i]} for i in range(50)]
    a, b, c = sample_batch(exs, 10, seed=0), sample_batch(exs, 10, seed=0), sample_batch(exs, 10, seed=1)
    assert a == b and a != c and len(a) == 10
    assert len({e["input_ids"][0] for e in a}) == 10  # without replacement
    assert sample_batch(exs, 50, seed=0) == exs and sample_batch(exs, 99, seed=5) == exs


# --------------------------------------------------------------------------- bad input


def test_missing_file(tok, tmp_path):
    msg = raises_one_line("not found", build_data, tok, DataConfig(dataset=str(tmp_path / "nope.jsonl")))
    assert "nope.jsonl" in msg


@pytest.mark.parametrize("name, content", [("e.jsonl", ""), ("e2.jsonl", "\n  \n"), ("e.json", "[]"), ("e.csv", "a,b\n")])
def test_empty_file(tok, tmp_path, name, content):
    f = tmp_path / name
    f.write_text(content, encoding="utf-8")
    raises_one_line("empty", build_data, tok, DataConfig(dataset=str(f)))


def test_unparseable_files(tok, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "answer": "b"}\n{"question": \n', encoding="utf-8")
    msg = raises_one_line("could not parse", build_data, tok, DataConfig(dataset=str(bad)))
    assert "JSON" in msg
    pq = tmp_path / "bad.parquet"
    pq.write_bytes(b"definitely not parquet")
    raises_one_line("could not parse", build_data, tok, DataConfig(dataset=str(pq)))


def test_missing_columns(tok, tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"foo": "x", "bar": "y"}])
    msg = raises_one_line("foo, bar", build_data, tok, DataConfig(dataset=str(f)))
    assert "--prompt-column" in msg
    msg = raises_one_line("found: foo, bar", build_data, tok, DataConfig(dataset=str(f), format="prompt-response"))
    assert "--prompt-column" in msg
    msg = raises_one_line("'nope'", build_data, tok, DataConfig(dataset=str(f), prompt_column="nope", response_column="bar"))
    assert "--prompt-column" in msg
    raises_one_line("--text-column", build_data, tok, DataConfig(dataset=str(f), format="text"))
    raises_one_line("--messages-column", build_data, tok, DataConfig(dataset=str(f), format="messages"))


def test_unknown_format(tok, tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", qa_rows(2))
    raises_one_line("unknown data format 'yaml'", build_data, tok, DataConfig(dataset=str(f), format="yaml"))


def test_all_overlong_with_drop(tok, tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", qa_rows(3))
    msg = raises_one_line("longer than", build_data, tok, DataConfig(dataset=str(f), max_length=8, overlong="drop"))
    assert "raise --max-length or use --overlong truncate" in msg


def test_no_examples_left(tok, tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"question": "a", "answer": ""}, {"question": "b", "answer": " "}])
    raises_one_line("no training examples left", build_data, tok, DataConfig(dataset=str(f)))


def test_bad_settings(tok, tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", qa_rows(2))
    raises_one_line("outside", build_data, tok, DataConfig(dataset=str(f), eval_split=1.5))
    raises_one_line("--overlong", build_data, tok, DataConfig(dataset=str(f), overlong="wrap"))
    raises_one_line("leaves no training", build_data, tok, DataConfig(dataset=str(f), eval_split=0.9))


def test_unknown_hub_dataset_offline(tok, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    raises_one_line("could not load dataset", build_data, tok, DataConfig(dataset="no-such-user/no-such-dataset"))


# --------------------------------------------------------------------------- GSM8K smoke


def test_gsm8k_first_lines(tok, tmp_path):
    if not GSM8K.exists():
        pytest.skip(f"{GSM8K} is not present")
    lines = GSM8K.read_text(encoding="utf-8").splitlines()[:20]
    f = tmp_path / "train.jsonl"
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    data = build_data(tok, DataConfig(dataset=str(f), max_length=1024, eval_split=0.1))
    assert data.format == "prompt-response"
    assert (data.stats.n_raw, data.stats.n_train, data.stats.n_eval) == (20, 18, 2)
    assert data.stats.n_empty_dropped == 0 and data.stats.n_truncated == 0
    answers = {json.loads(line)["answer"] for line in lines}
    for ex in data.train + data.eval:
        decoded = tok.decode(label_ids(ex))
        assert decoded.endswith(tok.eos_token) and decoded[: -len(tok.eos_token)] in answers
        assert "####" in decoded
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_bos_adding_tokenizer_without_chat_template():
    """A Llama-like tokenizer (adds BOS, no chat template): BOS once at the start, never in the response."""
    from tokenizers.processors import TemplateProcessing

    t = make_tiny_tokenizer()
    t._tokenizer.post_processor = TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    t.chat_template = None
    assert t("hi")["input_ids"][0] == t.bos_token_id
    cfg = DataConfig()
    rec = {"question": "Why?", "answer": "Because."}
    ex = tokenize_example(rec, t, cfg, "auto")
    k = n_prompt(ex)
    assert ex["input_ids"][:k] == [t.bos_token_id] + t("Why?\n", add_special_tokens=False)["input_ids"]
    assert ex["input_ids"][:k] == prompt_ids(rec, t, cfg, "prompt-response")
    assert t.bos_token_id not in ex["input_ids"][k:]
    assert t.decode(label_ids(ex)) == "Because." + t.eos_token
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    m = tokenize_example({"messages": conv}, t, cfg, "auto")
    assert m["input_ids"][0] == t.bos_token_id and t.decode(label_ids(m)) == "hello" + t.eos_token
    assert t.decode(m["input_ids"][: n_prompt(m)]) == t.bos_token + prompt_text({"messages": conv}, t, cfg, "messages")
    raises_one_line("no chat template", tokenize_example, rec, t, DataConfig(use_chat_template=True), "auto")
