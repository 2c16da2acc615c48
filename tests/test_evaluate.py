"""Evaluation: answer extraction, exact-match counting with faked generations, a real tiny run."""

import json
import math

import pytest

from qlora_ga import evaluate as ev
from qlora_ga.testing import assert_close_rel

EXAMPLES = [
    {"question": "Ava has 3 apples and buys 4 more. How many apples?", "answer": "3 + 4 = 7.\n#### 7"},
    {"question": "Ben packs 2 boxes of 6 coins. How many coins?", "answer": "2 * 6 = 12.\n#### 12"},
    {"question": "Cleo has 1,000 stamps and gets 250 more. How many?", "answer": "1000 + 250 = 1250\n#### 1,250"},
    {"question": "Dan shares 20 cards among 4 friends. How many each?", "answer": "20 / 4 = 5\n#### 5"},
    {"question": "Eli pays $3.50 for each of 2 pens. How much in total?", "answer": "2 * 3.50 = 7\n#### 7"},
]
# What the fake model "generates" for each question: 3 of 5 are right.
FAKE = {
    EXAMPLES[0]["question"]: "3 + 4 = 7\n#### 7",  # right
    EXAMPLES[1]["question"]: "2 * 6 = 11 so the answer is 11",  # wrong (last number)
    EXAMPLES[2]["question"]: "The total is $1,250.",  # right (commas, $, trailing period)
    EXAMPLES[3]["question"]: "#### 4\n#### 5",  # wrong (first #### wins)
    EXAMPLES[4]["question"]: "He pays 7.00 dollars",  # right (numeric comparison)
}


@pytest.mark.parametrize("text, want", [
    ("The answer is 42.", "42"),
    ("#### 1,234", "1234"),
    ("costs $5.50 each\n#### $5.50", "5.5"),
    ("she had 3 apples, then 7\n#### 10 apples", "10"),
    ("#### 72\n\nQuestion: next one\n#### 15", "72"),
    ("no numbers here", None),
    ("", None),
    (None, None),
    ("It was -3 degrees", "-3"),
    ("10-3 = 7", "7"),
    ("so 5-3", "3"),
    ("1,000,000 people", "1000000"),
    ("we get 5 ####", "5"),
    ("3.0", "3"),
    ("1,2,3", "3"),
    ("#### -12", "-12"),
    ("The answer: 12,345.60 dollars", "12345.6"),
    ("x = .5", "0.5"),
])
def test_extract_answer(text, want):
    assert ev.extract_answer(text) == want


def test_answers_match():
    assert ev.answers_match("3", "3.00") and ev.answers_match(ev.extract_answer("$1,250"), "1250")
    assert not ev.answers_match(None, "3") and not ev.answers_match("3", None) and not ev.answers_match("4", "3")


@pytest.fixture
def data_file(tmp_path):
    p = tmp_path / "heldout.jsonl"
    p.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    return p


def test_exact_match_count_with_faked_generation(tiny_model_dir, data_file, tmp_path, monkeypatch, capsys):
    seen = {}

    def fake_generate(model, tokenizer, prompts, **kw):
        seen.update(kw)
        texts = [tokenizer.decode(p) for p in prompts]
        out = []
        for t in texts:
            (q,) = [q for q in FAKE if q in t]
            assert t.rstrip().endswith("assistant")  # chat template with the generation prompt
            out.append(FAKE[q])
        return out

    monkeypatch.setattr(ev, "generate_texts", fake_generate)
    out = tmp_path / "report.json"
    rc = ev.main(["--model", str(tiny_model_dir), "--data", str(data_file), "--out", str(out), "--batch-size", "2",
                  "--max-new-tokens", "5", "--quiet"])
    assert rc == 0
    assert "exact_match=3" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["n"] == 5 and report["exact_match"] == 3 and report["exact_match_rate"] == pytest.approx(0.6)
    assert [p["correct"] for p in report["predictions"]] == [True, False, True, False, True]
    assert [p["gold"] for p in report["predictions"]] == ["7", "12", "1250", "5", "7"]
    assert [p["prediction"] for p in report["predictions"]] == ["7", "11", "1250", "4", "7"]
    assert math.isfinite(report["loss"]) and report["loss_tokens"] > 0
    assert seen == {"max_new_tokens": 5, "batch_size": 2, "progress": False}


def test_no_generate_gives_the_same_loss_without_generating(tiny_model_dir, data_file, tmp_path, monkeypatch, capsys):
    def no_generate(*a, **kw):
        raise AssertionError("--no-generate must not generate")

    full = ev.main(["--model", str(tiny_model_dir), "--data", str(data_file), "--out", str(tmp_path / "full.json"),
                    "--max-new-tokens", "2", "--quiet"])
    monkeypatch.setattr(ev, "generate_texts", no_generate)
    rc = ev.main(["--model", str(tiny_model_dir), "--data", str(data_file), "--out", str(tmp_path / "loss.json"),
                  "--no-generate", "--quiet"])
    assert full == rc == 0
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("full.json", "loss.json"))
    assert b["loss"] == a["loss"] and b["loss_tokens"] == a["loss_tokens"] > 0
    assert b["exact_match"] is None and b["predictions"] == []
    assert "exact_match=n/a" in capsys.readouterr().out
    assert ev.main(["--model", str(tiny_model_dir), "--data", str(data_file), "--no-generate", "--no-loss"]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


def test_loss_is_token_weighted_and_batch_independent(tiny_model_dir):
    from qlora_ga.model import load_model

    model, tok = load_model(tiny_model_dir, quantize=False)
    l1, n1 = ev.held_out_loss(model, tok, EXAMPLES, batch_size=1)
    l5, n5 = ev.held_out_loss(model, tok, EXAMPLES, batch_size=5)
    assert n1 == n5 > 0
    assert_close_rel(l1, l5, 1e-5, "loss, batch 1 vs 5")  # measured 1.9e-7
    # the token-weighted mean: sum of per-example (loss * tokens) over all tokens
    parts = [ev.held_out_loss(model, tok, [e]) for e in EXAMPLES]
    assert_close_rel(l1, sum(l * n for l, n in parts) / sum(n for _, n in parts), 1e-5, "loss vs token-weighted mean")


def test_real_run_on_tiny_model(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "report.json"
    rc = ev.main(["--model", str(tiny_model_dir), "--data", str(data_file), "--out", str(out), "--batch-size", "2",
                  "--max-new-tokens", "3", "--max-examples", "3", "--quiet"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["n"] == 3 and len(report["predictions"]) == 3 and report["quantized"] is True
    assert math.isfinite(report["loss"])
    for i, p in enumerate(report["predictions"]):
        assert set(p) == {"index", "question", "gold", "prediction", "correct", "output"}
        # each prediction is the answer read from its own output, judged against the example's gold answer
        assert (p["index"], p["question"], p["gold"]) == (i, EXAMPLES[i]["question"], ev.extract_answer(EXAMPLES[i]["answer"]))
        assert p["prediction"] == ev.extract_answer(p["output"]) and p["correct"] == ev.answers_match(p["prediction"], p["gold"])
    assert report["exact_match"] == sum(p["correct"] for p in report["predictions"])
    assert report["exact_match_rate"] == pytest.approx(report["exact_match"] / 3)


def test_left_padded_generation_matches_unbatched(tiny_model_dir):
    from qlora_ga.model import load_model

    model, tok = load_model(tiny_model_dir, quantize=False)
    prompts = [ev.prompt_ids(tok, e["question"]) for e in EXAMPLES[:3]]
    assert len({len(p) for p in prompts}) > 1  # different lengths: padding is exercised
    batched = ev.generate_texts(model, tok, prompts, max_new_tokens=4, batch_size=3, progress=False)
    single = ev.generate_texts(model, tok, prompts, max_new_tokens=4, batch_size=1, progress=False)
    assert batched == single


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    assert ev.main(["--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'answer'" in err
    assert ev.main(["--data", str(tmp_path / "missing.jsonl")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(SystemExit) as e:
        ev.main(["--data", str(bad), "--batch-size", "x"])
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1


# ----------------------------------------------------------------------------- the adapter and --out, checked


def _one_line(capsys) -> str:
    """The one line on stderr (the model loader's progress bars aside)."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and "it/s]" not in ln]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def _lora_on(model_dir, out, capsys):
    """A LoRA on the q_proj layers of the model in ``model_dir``, saved with PEFT's save_pretrained."""
    from peft import LoraConfig, get_peft_model

    from qlora_ga.model import load_model

    model, _ = load_model(model_dir, quantize=False)
    get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])).save_pretrained(out)
    capsys.readouterr()  # the loader's progress bars
    return out


def test_truncated_adapter_is_one_line(tiny_model_dir, data_file, tmp_path, capsys):
    adapter = _lora_on(tiny_model_dir, tmp_path / "adapter", capsys)
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a copy cut short
    assert ev.main(["--model", str(tiny_model_dir), "--no-quantize", "--adapter", str(adapter), "--data", str(data_file),
                    "--no-generate"]) == 2
    line = _one_line(capsys)
    assert line.startswith(f"error: '{weights}' is truncated or corrupt (Error while deserializing header: ")
    assert line.endswith("): export or copy it again")


def test_adapter_of_another_base_model_is_one_line(tiny_model_dir, data_file, tmp_path, capsys):
    from qlora_ga.testing import make_tiny_model

    other = make_tiny_model(tmp_path / "other-base", hidden=32, intermediate=64)
    adapter = _lora_on(other, tmp_path / "adapter", capsys)
    assert ev.main(["--model", str(tiny_model_dir), "--no-quantize", "--adapter", str(adapter), "--data", str(data_file),
                    "--no-generate"]) == 2
    assert _one_line(capsys) == (
        f"error: adapter '{adapter}' does not fit the model '{tiny_model_dir}': "
        "model.layers.0.self_attn.q_proj.lora_A.default.weight is [2, 32] in the adapter but [2, 64] in the model -- "
        f"the adapter was trained on another base model ('{other}'): pass that one with --model"
    )


def test_report_out_that_cannot_or_must_not_be_written_names_the_path(data_file, tmp_path, capsys):
    """Checked before the model loads (this one does not exist): no evaluation is run for a report that cannot be written."""
    import os

    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    data = data_file.read_text()

    def refused(out) -> str:
        assert ev.main(["--model", str(tmp_path / "never-loaded"), "--data", str(data_file), "--out", str(out)]) == 2
        return _one_line(capsys)

    assert refused(blocker / "report.json") == (
        f"error: cannot write the report to '{blocker / 'report.json'}': '{blocker}' is a file, not a folder: "
        "choose another --out")
    assert refused(blocker) == f"error: --out '{blocker}' exists and is not a report of evaluate.py: choose another --out"
    assert refused(data_file) == f"error: --out '{data_file}' is the --data file: choose another --out"
    assert refused(tmp_path) == f"error: --out '{tmp_path}' is a folder: pass a file name, e.g. {tmp_path / 'report.json'}"
    if os.path.isdir("/sys/kernel"):  # sysfs takes no new files, not even from root
        assert refused("/sys/qlora-ga-report.json").startswith("error: cannot write the report to '/sys/qlora-ga-report.json': ")
    assert blocker.read_text() == "mine" and data_file.read_text() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", data_file.name]


def test_report_write_failure_names_the_path_and_keeps_the_numbers(tiny_model_dir, data_file, tmp_path, capsys,
                                                                   monkeypatch):
    import errno

    def denied(path, data):
        raise PermissionError(errno.EPERM, "Operation not permitted", str(path))

    monkeypatch.setattr(ev, "atomic_write", denied)
    out = tmp_path / "report.json"
    assert ev.main(["--model", str(tiny_model_dir), "--no-quantize", "--data", str(data_file), "--out", str(out),
                    "--no-generate", "--quiet"]) == 2
    cap = capsys.readouterr()
    errors = [ln for ln in cap.err.splitlines() if ln.strip() and "it/s]" not in ln]  # the loader's progress bars aside
    assert errors == [f"error: cannot write the report to '{out}': Operation not permitted: choose another --out"]
    assert cap.out.startswith("n=5 exact_match=n/a loss=")  # the numbers are printed all the same
