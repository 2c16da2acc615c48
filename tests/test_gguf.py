"""GGUF export: llama.cpp's own converter on a fine-tuned SmolLM2, the Ollama Modelfile, and every bad input.

The converter (llama-cpp-python 0.3.36's vendored llama.cpp) is fetched once from PyPI into
``$QLORA_GA_CACHE`` (``.ci/run`` sets it inside the clone).
"""

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from qlora_ga.cli import main as finetune_main
from qlora_ga.errors import QloraGaError
from qlora_ga.export import gguf, modelfile, save_adapter
from qlora_ga.export import main as export_main
from qlora_ga.arch import resolve_targets
from qlora_ga.model import default_model_path, load_model, resolve_model_source
from qlora_ga.testing import CHAT_TEMPLATE, assert_close_rel, make_tiny_tokenizer

# Bounds from docs/RESULTS.md section 9 (SmolLM2, 1,441 positions): f16 is a lossless copy of the fp16
# merged model (max |delta logit| 0.0); q8_0 moved the logits by at most 3.2 % of the largest logit
# (1.46), top-1 agreement 99.2 %.
F16_MAX_REL = 1e-4  # of the largest logit: measured 0 (the same fp16 weights)
Q8_MAX_REL = 0.05
TEXT = "Question: Tom has 3 apples and buys 12 more. How many apples does he have?\nAnswer: 15 #### 15"


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# ----------------------------------------------------------------------------- SmolLM2, fine-tuned, to GGUF


@pytest.fixture(scope="module")
def smol_run(tmp_path_factory):
    """SmolLM2-135M (4-bit) fine-tuned 2 steps, exported merged (fp16) and as GGUF f16 by finetune.py --export_gguf."""
    out = tmp_path_factory.mktemp("smol") / "run"
    code = finetune_main([
        "--model", default_model_path(), "--output_dir", str(out), "--n_builtin", "16", "--max_length", "64",
        "--batch_size", "2", "--grad_accum", "1", "--max_steps", "2", "--init", "gaussian", "--lr", "2e-3",
        "--sample_prompts", "0", "--no_gradient_checkpointing", "--export_merged", "--export_gguf", "f16",
    ])
    assert code == 0
    return out


@torch.no_grad()
def _logits(folder, gguf_file=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    tok = AutoTokenizer.from_pretrained(str(folder), **kw)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kw)
    ids = tok(TEXT, return_tensors="pt").input_ids
    return ids, model(ids).logits[0]


@pytest.fixture(scope="module")
def merged_logits(smol_run):
    return _logits(smol_run / "merged")


def test_smollm2_gguf_f16_matches_the_merged_model(smol_run, merged_logits):
    g = smol_run / "gguf"
    assert sorted(p.name for p in g.iterdir()) == ["Modelfile", "model-f16.gguf", "qlora_ga.json"]
    assert _leftovers(smol_run) == []
    meta = json.loads((g / "qlora_ga.json").read_text())
    assert meta["gguf_type"] == "f16" and meta["merged_dtype"] == "float16" and meta["chat_format"] == "chatml"
    assert meta["merge_base"] == "original" and meta["base_model"] == default_model_path()
    assert meta["converter"]["sha256"] == gguf.SDIST_SHA256 or "llama_cpp_dir" in meta["converter"]

    ids_m, merged = merged_logits
    ids_g, f16 = _logits(g, "model-f16.gguf")
    assert torch.equal(ids_m, ids_g)  # the GGUF's own vocabulary tokenizes the same
    _, base = _logits(resolve_model_source(default_model_path()))
    assert (merged - base).abs().max() > 0.05  # the fine-tune really changed the model being compared
    assert_close_rel(f16, merged, F16_MAX_REL, "logits")


def test_smollm2_gguf_q8_0_replaces_an_old_out(smol_run, merged_logits, tmp_path):
    out = tmp_path / "q8"
    out.mkdir()
    (out / "old.gguf").write_text("replaced when the new export is complete")
    g = gguf.gguf_export(smol_run / "adapter", out, "q8_0", merged_dir=smol_run / "merged")  # finetune's merge, reused
    assert g.chat_format == "chatml" and g.bytes == (out / "model-q8_0.gguf").stat().st_size
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model-q8_0.gguf", "qlora_ga.json"]
    assert _leftovers(tmp_path) == []
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # readable like any folder (e.g. by an Ollama service)
    from gguf import GGUFReader

    r = GGUFReader(str(out / "model-q8_0.gguf"))
    assert {t.tensor_type.name for t in r.tensors if t.name == "blk.0.attn_q.weight"} == {"Q8_0"}
    ids_m, merged = merged_logits
    ids_q8, q8 = _logits(out, "model-q8_0.gguf")
    assert torch.equal(ids_q8, ids_m)  # its own vocabulary tokenizes the same
    assert assert_close_rel(q8, merged, Q8_MAX_REL, "logits") > 0
    assert (q8.argmax(-1) == merged.argmax(-1)).float().mean() >= 0.9
    assert (out / "model-q8_0.gguf").stat().st_size < 0.6 * (smol_run / "gguf" / "model-f16.gguf").stat().st_size


def test_smollm2_modelfile(smol_run):
    text = (smol_run / "gguf" / "Modelfile").read_text()
    assert "FROM ./model-f16.gguf\n" in text
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"""' in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    assert [ln for ln in text.splitlines() if ln.startswith("PARAMETER")] == ['PARAMETER stop "<|im_end|>"']


def test_greedy_generation_with_llama_cpp_equals_the_merged_model(smol_run):
    """Needs llama-cpp-python (compiled from source; not in the default CI install)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smol_run / "merged"))
    model = AutoModelForCausalLM.from_pretrained(str(smol_run / "merged"), dtype=torch.float32)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Explain step by step how to compute 17 times 23."}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt).input_ids
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
    llm = llama_cpp.Llama(str(smol_run / "gguf" / "model-f16.gguf"), n_ctx=256, n_threads=2, verbose=False)
    out = []
    for t in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(t)
        if len(out) == 32 or t == tok.eos_token_id:
            break
    assert len(ref) == 32 and out == ref


# ----------------------------------------------------------------------------- bad input (a tiny model, fake converters)


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model_dir, tmp_path_factory):
    """A random LoRA on the tiny Llama (the fake converters below never look at it)."""
    from peft import LoraConfig, get_peft_model

    model, _ = load_model(tiny_model_dir)
    pm = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=list(resolve_targets(model))))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.1)
    out = tmp_path_factory.mktemp("tiny-gguf") / "adapter"
    save_adapter(pm, out)
    return out


def _fake_llama_cpp(folder: Path, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "convert_hf_to_gguf.py").write_text("import sys\n" + body)
    return folder


def _export(capsys, *argv):
    code = export_main(list(map(str, argv)))
    return code, capsys.readouterr()


def test_unknown_gguf_type_is_one_line_and_writes_nothing(tiny_adapter, tmp_path, capsys):
    code, cap = _export(capsys, "--adapter", tiny_adapter, "--out", tmp_path / "out", "--gguf", "q5_x")
    assert code == 2
    assert "unknown GGUF type 'q5_x': use one of f16, bf16, q8_0, q4_k_m" in _one_error_line(cap.err)
    assert list(tmp_path.iterdir()) == []


def test_failing_converter_shows_its_last_line_and_keeps_out(tiny_adapter, tmp_path, capsys):
    conv = _fake_llama_cpp(tmp_path / "llama.cpp", (
        "print('INFO: loading model', file=sys.stderr)\n"
        "print('Traceback (most recent call last):', file=sys.stderr)\n"
        "raise NotImplementedError('BPE pre-tokenizer was not recognized - update get_vocab_base_pre()')\n"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "model-f16.gguf").write_text("an earlier export")
    (out / "qlora_ga.json").write_text('{"format": "qlora-ga-gguf"}')
    code, cap = _export(capsys, "--adapter", tiny_adapter, "--out", out, "--gguf", "f16", "--llama-cpp", conv, "--overwrite")
    assert code == 2
    line = _one_error_line(cap.err)
    assert line.startswith("error: llama.cpp's converter failed (exit 1): NotImplementedError: BPE pre-tokenizer was not recognized")
    assert sorted(p.name for p in out.iterdir()) == ["model-f16.gguf", "qlora_ga.json"]
    assert (out / "model-f16.gguf").read_text() == "an earlier export"
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("module, package", [("sentencepiece_not_here", "sentencepiece_not_here"), ("google.protobuf", "protobuf")])
def test_converter_missing_a_module_names_the_pip_command(tiny_adapter, tmp_path, capsys, module, package):
    conv = _fake_llama_cpp(tmp_path / "llama.cpp", f"raise ModuleNotFoundError(\"No module named '{module}'\")\n")
    code, cap = _export(capsys, "--adapter", tiny_adapter, "--out", tmp_path / "out", "--gguf", "q8_0", "--llama-cpp", conv)
    assert code == 2
    assert _one_error_line(cap.err).endswith(f"No module named '{module}': install it with 'pip install {package}'")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_disk_full_during_conversion_is_one_line(tiny_adapter, tmp_path, capsys):
    conv = _fake_llama_cpp(tmp_path / "llama.cpp", (
        "open(sys.argv[3], 'wb').write(b'GGUF partial')\n"
        "raise OSError(28, 'No space left on device')\n"))
    code, cap = _export(capsys, "--adapter", tiny_adapter, "--out", tmp_path / "out", "--gguf", "f16", "--llama-cpp", conv)
    assert code == 2
    assert f"error: no space left on the device of {tmp_path}: free some space" in _one_error_line(cap.err)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_not_enough_free_space_is_refused_before_writing(tiny_adapter, tmp_path, capsys, monkeypatch):
    conv = _fake_llama_cpp(tmp_path / "llama.cpp", "raise SystemExit('must not run')\n")
    monkeypatch.setattr(gguf.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    code, cap = _export(capsys, "--adapter", tiny_adapter, "--out", tmp_path / "out", "--gguf", "q8_0", "--llama-cpp", conv)
    assert code == 2
    assert "not enough disk space for the GGUF export" in _one_error_line(cap.err)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_q4_k_m_without_llama_cpp_python_says_what_to_install(tiny_adapter, tmp_path, capsys, monkeypatch):
    real = gguf.importlib.util.find_spec
    monkeypatch.setattr(gguf.importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    code, cap = _export(capsys, "--adapter", tiny_adapter, "--out", tmp_path / "out", "--gguf", "q4_k_m")
    assert code == 2
    assert "pip install llama-cpp-python==0.3.36" in _one_error_line(cap.err)
    assert list(tmp_path.iterdir()) == []


def test_llama_cpp_dir_without_converter_is_one_line(tiny_adapter, tmp_path, capsys):
    code, cap = _export(capsys, "--adapter", tiny_adapter, "--out", tmp_path / "out", "--gguf", "f16", "--llama-cpp", tmp_path)
    assert code == 2
    assert "has no convert_hf_to_gguf.py" in _one_error_line(cap.err)
    code, cap = _export(capsys, "--adapter", tiny_adapter, "--out", tmp_path / "out", "--llama-cpp", tmp_path)
    assert code == 2 and "--llama-cpp only applies with --gguf" in _one_error_line(cap.err)


# ----------------------------------------------------------------------------- fetching the converter


def _fake_sdist(path: Path, vendor: str) -> str:
    files = {
        vendor + "convert_hf_to_gguf.py": b"print('converter')\n",
        vendor + "conversion/__init__.py": b"",
        vendor + "gguf-py/gguf/__init__.py": b"",
        vendor + "LICENSE": b"MIT\n",
        vendor + "ggml/src/ggml.c": b"int main;\n",  # not needed by the converter: not extracted
        vendor + "convert_lora_to_gguf.py": b"",
        "llama_cpp_python-0.3.36/llama_cpp/llama.py": b"",
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fetch_extracts_only_the_converter_atomically(tmp_path, monkeypatch):
    sdist = tmp_path / "sdist.tar.gz"
    digest = _fake_sdist(sdist, gguf.SDIST_VENDOR)
    monkeypatch.setenv("QLORA_GA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(gguf, "SDIST_URL", sdist.as_uri())
    monkeypatch.setattr(gguf, "SDIST_SHA256", digest)
    conv = gguf.find_converter()
    assert conv == tmp_path / "cache" / "llama.cpp" / "llama-cpp-python-0.3.36"
    files = sorted(str(p.relative_to(conv)) for p in conv.rglob("*") if p.is_file())
    assert files == ["LICENSE", "conversion/__init__.py", "convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py",
                     "qlora_ga_source.json"]
    assert json.loads((conv / "qlora_ga_source.json").read_text())["sha256"] == digest
    assert sorted(p.name for p in conv.parent.iterdir()) == ["llama-cpp-python-0.3.36"]  # no temp folder left
    sdist.unlink()
    assert gguf.find_converter() == conv  # cached: not fetched again


def test_fetch_failures_are_one_line_and_leave_no_cache(tmp_path, monkeypatch, tiny_adapter, capsys):
    monkeypatch.setenv("QLORA_GA_CACHE", str(tmp_path / "cache"))
    sdist = tmp_path / "sdist.tar.gz"
    _fake_sdist(sdist, gguf.SDIST_VENDOR)
    monkeypatch.setattr(gguf, "SDIST_URL", sdist.as_uri())  # a different file than the pinned one
    with pytest.raises(QloraGaError, match=r"sha256 .* is not the pinned .*--llama-cpp DIR"):
        gguf.find_converter()
    monkeypatch.setattr(gguf, "SDIST_URL", (tmp_path / "missing.tar.gz").as_uri())
    code, cap = _export(capsys, "--adapter", tiny_adapter, "--out", tmp_path / "out", "--gguf", "f16")
    assert code == 2
    assert _one_error_line(cap.err).startswith("error: cannot fetch llama.cpp's converter (llama-cpp-python 0.3.36")
    assert list((tmp_path / "cache" / "llama.cpp").iterdir()) == [] and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- the Ollama chat template

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ALPACA_TEMPLATE = "{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n\n{% endfor %}### assistant:\n"
NO_SYSTEM_TEMPLATE = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}" + CHAT_TEMPLATE


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


def _with_template(tok, template):
    import copy

    t = copy.copy(tok)
    t.chat_template = template
    return t


def test_chatml_template(tok):
    chat = modelfile.ollama_chat(tok, eos_token_ids=[tok.convert_tokens_to_ids("<|endoftext|>")])
    assert (chat.format, chat.system) == ("chatml", None)
    assert chat.stops == ["<|im_end|>", "<|endoftext|>"]
    text = modelfile.modelfile_text("model-q8_0.gguf", chat)
    assert "SYSTEM" not in text and 'PARAMETER stop "<|endoftext|>"' in text and "FROM ./model-q8_0.gguf" in text


def test_chatml_with_a_default_system_prompt(tok):
    chat = modelfile.ollama_chat(_with_template(tok, SMOL_TEMPLATE))
    assert (chat.format, chat.system) == ("chatml", "You are a helpful AI assistant")


def test_llama3_template_bos_left_to_llama_cpp():
    t = _with_template(make_tiny_tokenizer(), LLAMA3_TEMPLATE)  # a fresh one: special tokens get added
    t.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    chat = modelfile.ollama_chat(t, eos_token_ids=t.convert_tokens_to_ids("<|eot_id|>"))
    assert chat.format == "llama3" and chat.system is None
    assert chat.stops == ["<|eot_id|>", "<|im_end|>"]
    assert t.bos_token not in chat.template
    assert 'TEMPLATE """{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}' \
        in modelfile.modelfile_text("m.gguf", chat)


@pytest.mark.parametrize("template", [ALPACA_TEMPLATE, NO_SYSTEM_TEMPLATE, None])
def test_unknown_or_missing_template_gets_a_warning_not_a_wrong_template(tok, template):
    chat = modelfile.ollama_chat(_with_template(tok, template))
    text = modelfile.modelfile_text("m.gguf", chat)
    assert chat.format is None and not any(ln.startswith(("TEMPLATE", "SYSTEM")) for ln in text.splitlines())
    assert "# WARNING: no TEMPLATE" in text and 'PARAMETER stop "<|im_end|>"' in text
    assert ("no chat template" in text) == (template is None)


def test_out_may_not_replace_the_adapter(tiny_adapter, tmp_path, capsys):
    conv = _fake_llama_cpp(tmp_path / "llama.cpp", "raise SystemExit('must not run')\n")
    for out in (tiny_adapter, tiny_adapter.parent):
        code, cap = _export(capsys, "--adapter", tiny_adapter, "--out", out, "--gguf", "f16", "--llama-cpp", conv)
        assert code == 2 and "would replace the adapter or model folder" in _one_error_line(cap.err)
    assert (tiny_adapter / "adapter_config.json").is_file()


def test_disk_full_in_the_merge_is_one_line(tiny_adapter, tmp_path, capsys, monkeypatch):
    import errno

    conv = _fake_llama_cpp(tmp_path / "llama.cpp", "raise SystemExit('must not run')\n")

    def full(adapter, out, **kw):
        Path(out).mkdir(parents=True)
        (Path(out) / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf, "merge_export", full)
    code, cap = _export(capsys, "--adapter", tiny_adapter, "--out", tmp_path / "out", "--gguf", "f16", "--llama-cpp", conv)
    assert code == 2 and f"no space left on the device of {tmp_path}: free some space" in _one_error_line(cap.err)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_gguf_out_holding_an_earlier_export_needs_overwrite(tiny_adapter, tmp_path, capsys):
    conv = _fake_llama_cpp(tmp_path / "llama.cpp", "raise SystemExit('must not run')\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "model-f16.gguf").write_text("an earlier export")
    (out / "qlora_ga.json").write_text('{"format": "qlora-ga-gguf"}')
    code, cap = _export(capsys, "--adapter", tiny_adapter, "--out", out, "--gguf", "q8_0", "--llama-cpp", conv)
    assert code == 2
    assert _one_error_line(cap.err) == (f"error: --out '{out}' holds an earlier GGUF export: pass --overwrite to "
                                        "replace it, or choose another --out")
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "qlora_ga.json").write_text('{"format": "qlora-ga-merged"}')
    code, cap = _export(capsys, "--adapter", tiny_adapter, "--out", merged, "--gguf", "f16", "--llama-cpp", conv, "--overwrite")
    assert code == 2
    assert _one_error_line(cap.err) == f"error: --out '{merged}' holds a merged-model export, not a GGUF export: choose another --out"
    code, cap = _export(capsys, "--adapter", tiny_adapter, "--out", conv, "--gguf", "f16", "--llama-cpp", conv)
    assert code == 2 and f"(it is the llama.cpp folder '{conv}')" in _one_error_line(cap.err)
    assert (out / "model-f16.gguf").read_text() == "an earlier export" and (conv / "convert_hf_to_gguf.py").is_file()
    assert _leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- an export interrupted or killed mid-conversion

REPO = Path(__file__).resolve().parents[1]
# A converter that says who it is (in its cwd, the llama.cpp folder) and then takes its time.
SLOW_CONVERTER = "import os, time\nopen('pid.tmp', 'w').write(str(os.getpid()))\nos.replace('pid.tmp', 'pid')\ntime.sleep(60)\n"
linux_only = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads process states in /proc")


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting for its parent to reap it runs no more)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _gone(pid: int, timeout: float = 5.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _running(pid)


def _converter_pid(conv: Path, alive=lambda: True, timeout: float = 90.0) -> int | None:
    """The fake converter's pid once it runs; None when ``alive()`` turns false or the time is up first."""
    import time

    deadline = time.monotonic() + timeout
    while not (conv / "pid").is_file():
        if not alive() or time.monotonic() > deadline:
            return None
        time.sleep(0.05)
    return int((conv / "pid").read_text())


@linux_only
def test_ctrl_c_during_conversion_kills_the_converter_and_writes_nothing(tiny_adapter, tmp_path, capsys):
    import signal
    import threading

    conv = _fake_llama_cpp(tmp_path / "llama.cpp", SLOW_CONVERTER)
    out = tmp_path / "out"
    done, pids = threading.Event(), []

    def ctrl_c():  # SIGINT to the main thread while it waits for the converter, as a Ctrl-C does
        pid = _converter_pid(conv, alive=lambda: not done.is_set())
        if pid is not None:
            pids.append(pid)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    thread = threading.Thread(target=ctrl_c)
    thread.start()
    try:
        code, cap = _export(capsys, "--adapter", tiny_adapter, "--out", out, "--gguf", "f16", "--llama-cpp", conv)
    except KeyboardInterrupt:
        pytest.fail("the KeyboardInterrupt escaped export.py's main")
    finally:
        done.set()
        thread.join()
        for pid in pids:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
    assert pids, "the converter never started"
    assert (code, cap.err) == (130, "interrupted: nothing was written to --out\n")
    assert not _running(pids[0])  # killed and waited for before export.py returned, not left writing
    assert not out.exists() and _leftovers(tmp_path) == []


@linux_only
def test_killed_export_takes_the_converter_with_it(tmp_path):
    """export.py killed by SIGKILL while the converter runs (the conversion step alone, to keep the child process
    light): the kernel kills the converter too, nothing is left writing."""
    import signal
    import subprocess
    import sys

    conv = _fake_llama_cpp(tmp_path / "llama.cpp", SLOW_CONVERTER)
    out = tmp_path / "out"
    log = tmp_path / "export.log"
    convert = ("import sys; from pathlib import Path; from qlora_ga.export.gguf import run_converter; "
               "run_converter(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), 'f16')")
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-c", convert, str(conv), str(tmp_path), str(out / "model-f16.gguf")],
                                cwd=REPO, stdout=f, stderr=f)
    pid = None
    try:
        pid = _converter_pid(conv, alive=lambda: proc.poll() is None)
        assert pid is not None, log.read_text()
        proc.kill()  # SIGKILL: export.py cannot clean up anything itself
        proc.wait()
        assert _gone(pid), "the converter outlived the killed export.py"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if pid is not None and _running(pid):
            os.kill(pid, signal.SIGKILL)
    assert not out.exists()
