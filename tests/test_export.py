"""Export: vanilla-PEFT adapter (rank-2r with a residual), streamed merged checkpoints, the CLI."""

import json
import os
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qlora_ga import export
from qlora_ga.errors import QloraGaError
from qlora_ga.export import adapter as export_adapter
from qlora_ga.export import base as export_base
from qlora_ga.arch import resolve_targets
from qlora_ga.model import load_model
from qlora_ga.residual import attach_residual, iter_residuals, residual_state_dict
from qlora_ga.testing import assert_close_rel

REPO = Path(__file__).resolve().parents[1]
R, ALPHA = 4, 8
TOL = 1e-4  # of the largest logit (measured at most 1.5e-6)


def _peft_model(model_dir, seed=0):
    from peft import LoraConfig, get_peft_model

    model, _ = load_model(model_dir)
    pm = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, use_rslora=True, target_modules=list(resolve_targets(model))))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.eval()
    return pm


def _lora_layers(pm):
    return {n: m for n, m in pm.named_modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}


def _attach_random_residuals(pm, skip=("layers.2.mlp.down_proj",), seed=1):
    g = torch.Generator().manual_seed(seed)
    for name, layer in _lora_layers(pm).items():
        if any(name.endswith(s) for s in skip):
            continue
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        attach_residual(layer, torch.randn(A.shape, generator=g) * 0.1, torch.randn(B.shape, generator=g) * 0.1)


def _inputs():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 300, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


@torch.no_grad()
def _logits(model):
    ids, mask = _inputs()
    return model(input_ids=ids, attention_mask=mask).logits.float()


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """One PeftModel exported twice: without residuals, then with residuals on all but one layer."""
    root = tmp_path_factory.mktemp("export")
    pm = _peft_model(tiny_model_dir)
    plain_logits = _logits(pm)
    export.save_adapter(pm, root / "plain")
    _attach_random_residuals(pm)
    res_logits = _logits(pm)
    assert (res_logits - plain_logits).abs().max() > 1e-2  # the residual really changes the function
    export.save_adapter(pm, root / "res")
    ref = {}  # module -> (A, B, A0 or None, B0 or None, s), for the tensor-by-tensor merge check
    res = {export_adapter.module_key(n): (a0, b0) for n, _, a0, b0 in iter_residuals(pm)}
    for name, layer in _lora_layers(pm).items():
        key = export_adapter.module_key(name)
        a0, b0 = res.get(key, (None, None))
        ref[key] = (layer.lora_A["default"].weight.detach().clone(), layer.lora_B["default"].weight.detach().clone(),
                    a0, b0, layer.scaling["default"])
    return dict(root=root, pm=pm, plain=root / "plain", res=root / "res", plain_logits=plain_logits,
                res_logits=res_logits, ref=ref)


def _reload(model_dir, adapter_dir):
    from peft import PeftModel

    base, _ = load_model(model_dir)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def test_adapter_without_residual_reloads_in_vanilla_peft(trained, tiny_model_dir):
    cfg = json.loads((trained["plain"] / "adapter_config.json").read_text())
    assert cfg["r"] == R and cfg["lora_alpha"] == ALPHA and cfg["use_rslora"] is True
    meta = export.read_metadata(trained["plain"])
    assert meta["has_residual"] is False and meta["rank"] == R and meta["scaling"] == pytest.approx(ALPHA / R**0.5)
    assert meta["base_model"] == str(tiny_model_dir)
    diff = assert_close_rel(_logits(_reload(tiny_model_dir, trained["plain"])), trained["plain_logits"], TOL, "logits")
    print(f"vanilla reload, no residual: max |dlogit| = {diff:.2e} of the largest logit")


def test_adapter_with_residual_is_rank_2r_and_reloads_in_vanilla_peft(trained, tiny_model_dir):
    d = trained["res"]
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["r"] == 2 * R and cfg["use_rslora"] is True
    assert cfg["lora_alpha"] / (2 * R) ** 0.5 == pytest.approx(ALPHA / R**0.5)
    assert cfg["rank_pattern"] == {"model.layers.2.mlp.down_proj": R}  # the one layer without a residual
    meta = export.read_metadata(d)
    assert meta["has_residual"] and meta["rank"] == R and meta["exported_rank"] == 2 * R
    assert len(meta["residual_modules"]) == 3 * 7 - 1
    sd = load_file(str(d / "adapter_model.safetensors"))
    a, b, a0, b0, _ = trained["ref"]["model.layers.0.self_attn.q_proj"]
    A2 = sd["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    B2 = sd["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert torch.equal(A2, torch.cat([a, a0])) and torch.equal(B2, torch.cat([b, -b0], dim=1))

    (d / export.METADATA_FILE).rename(d.parent / "meta.bak")  # the adapter must not need qlora_ga.json
    try:
        reloaded = _logits(_reload(tiny_model_dir, d))
    finally:
        (d.parent / "meta.bak").rename(d / export.METADATA_FILE)
    diff = assert_close_rel(reloaded, trained["res_logits"], TOL, "logits")
    print(f"vanilla reload, rank-2r with residual: max |dlogit| = {diff:.2e} of the largest logit")


@pytest.mark.parametrize("residual_file", export.RESIDUAL_FILES)
def test_residual_file_next_to_rank_r_adapter_is_folded(trained, tmp_path, residual_file):
    pm = trained["pm"]
    ckpt = tmp_path / "ckpt"
    pm.save_pretrained(str(ckpt))
    save_file(residual_state_dict(pm), str(ckpt / residual_file))
    export.export_adapter(ckpt, tmp_path / "out")
    got, want = load_file(str(tmp_path / "out" / "adapter_model.safetensors")), load_file(str(trained["res"] / "adapter_model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    want_cfg = json.loads((trained["res"] / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["rank_pattern"], cfg["alpha_pattern"]) == (want_cfg["r"], want_cfg["rank_pattern"], want_cfg["alpha_pattern"])
    assert cfg["lora_alpha"] == pytest.approx(want_cfg["lora_alpha"])


def test_save_adapter_is_atomic(trained, tmp_path, monkeypatch):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "keep.txt").write_text("old")

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export_adapter, "save_safetensors", boom)
    with pytest.raises(RuntimeError):
        export.save_adapter(trained["pm"], out)
    assert (out / "keep.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temp folder left
    monkeypatch.undo()
    export.save_adapter(trained["pm"], out)
    assert not (out / "keep.txt").exists() and (out / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_merged_dequantized_reproduces_trained_logits(trained, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    stats = export.merge_export(trained["res"], out, dtype="fp32", merge_base="dequantized")
    assert stats.tensors_merged == 21 and stats.tensors_dequantized == 21 and stats.shards == 1
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "float32"
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).is_file(), f
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    diff = assert_close_rel(_logits(model), trained["res_logits"], TOL, "logits")
    print(f"merged (dequantized, fp32) vs trained 4-bit+LoRA+residual: max |dlogit| = {diff:.2e} of the largest logit")

    # Without qlora_ga.json the quantized weights come from the model structure: same result.
    bare = tmp_path / "bare"
    shutil.copytree(trained["res"], bare)
    (bare / export.METADATA_FILE).unlink()
    export.merge_export(bare, tmp_path / "merged2", dtype="fp32", merge_base="dequantized")
    a, b = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "merged2" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_merged_original_is_w_plus_s_ba_minus_b0a0(trained, tiny_model_dir, tmp_path):
    out = tmp_path / "merged"
    stats = export.merge_export(trained["res"], out, dtype="fp32")
    assert stats.tensors_merged == 21 and stats.tensors_dequantized == 0
    ref = trained["ref"]
    merged = load_file(str(out / "model.safetensors"))
    n_target = n_copied = 0
    with safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(merged)
        for key in f.keys():
            w = f.get_tensor(key)
            mod = key.removesuffix(".weight")
            if mod in ref:
                a, b, a0, b0, s = ref[mod]
                delta = b @ a - (b0 @ a0 if a0 is not None else 0)
                assert_close_rel(merged[key], w + s * delta, 1e-5, "merged weight")  # measured 1.5e-7
                n_target += 1
            else:
                assert merged[key].dtype == w.dtype and torch.equal(merged[key], w), key
                n_copied += 1
    assert n_target == 21 and n_copied > 0


def test_merge_streams_one_shard_at_a_time(trained, tiny_sharded_model_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    live = {"bytes": 0, "peak": 0, "reads": 0}
    real = export_base._read_tensor

    def _release(n):
        live["bytes"] -= n

    def tracked(handle, name):
        t = real(handle, name)
        n = t.numel() * t.element_size()
        live["bytes"] += n
        live["reads"] += 1
        live["peak"] = max(live["peak"], live["bytes"])
        weakref.finalize(t, _release, n)
        return t

    monkeypatch.setattr(export_base, "_read_tensor", tracked)
    in_shards = list(tiny_sharded_model_dir.glob("model-*.safetensors"))
    assert len(in_shards) > 2
    out = tmp_path / "merged"
    stats = export.merge_export(trained["res"], out, base=str(tiny_sharded_model_dir), dtype="fp32",
                                max_shard_size="60KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    out_shards = sorted(out.glob("model-*.safetensors"))
    assert stats.shards == len(out_shards) > 2 and len(set(index["weight_map"].values())) == len(out_shards)
    assert stats.tensors_written == live["reads"] == len(index["weight_map"])
    largest_shard = max(p.stat().st_size for p in out_shards)
    print(f"streaming: peak read bytes live {live['peak']}, largest shard {largest_shard}, "
          f"largest tensor {stats.largest_tensor_bytes}, reported peak {stats.peak_bytes}, total {stats.total_bytes}")
    assert live["peak"] <= largest_shard + stats.largest_tensor_bytes
    assert live["peak"] < stats.total_bytes / 2
    assert stats.peak_bytes <= export.parse_size("60KB") + 3 * stats.largest_tensor_bytes
    # the shard layout is huggingface_hub's (save_pretrained's) for the merged tensors in reading order,
    # though the merge planned it from the header sizes before reading any tensor
    merged = {}
    for p in out_shards:
        merged.update(load_file(str(p)))
    order = [k for p in sorted(in_shards) for k in sorted(safe_open(str(p), "pt").keys())]
    want = split_torch_state_dict_into_shards({k: merged[k] for k in order}, max_shard_size=export.parse_size("60KB"))
    assert index["weight_map"] == want.tensor_to_filename and index["metadata"] == want.metadata
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.num_hidden_layers == 3


def test_fp16_overflow_is_a_one_line_error_and_leaves_nothing(trained, tiny_model_dir, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    sd = load_file(str(base / "model.safetensors"))
    sd["model.layers.1.mlp.up_proj.weight"][3, 5] = 1e5
    save_file(sd, str(base / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "merged"
    with pytest.raises(QloraGaError) as e:
        export.merge_export(trained["res"], out, base=str(base), dtype="fp16")
    msg = str(e.value)
    assert "\n" not in msg and "--dtype bf16" in msg and "model.layers.1.mlp.up_proj.weight" in msg
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]
    out.mkdir()
    (out / "keep.txt").write_text("old")  # an existing output survives a failed export
    with pytest.raises(QloraGaError):
        export.merge_export(trained["res"], out, base=str(base), dtype="fp16")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    stats = export.merge_export(trained["res"], out, base=str(base), dtype="bf16")  # bf16 holds it
    assert stats.dtype == "bfloat16" and not (out / "keep.txt").exists()


def test_export_cli(trained, tmp_path, capsys):
    assert export.main(["--adapter", str(trained["res"]), "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == (trained["res"] / "adapter_model.safetensors").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        export.main(["--adapter", "x", "--out", "y", "--dtype", "fp8"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--dtype" in err
    assert export.main(["--adapter", str(trained["res"]), "--out", str(tmp_path / "b"), "--merge", "--base",
                        str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err and not (tmp_path / "b").exists()


def test_export_script_bad_adapter_exits_2_with_one_line(tmp_path):
    """The real process, once the libraries are loaded (a config that is not JSON: read through peft): exit 2 and
    one line on stderr, no library warnings."""
    bad = tmp_path / "adapter"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "export.py"), "--adapter", str(bad), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"),
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()  # nothing but the line (no library warnings)
    assert len(lines) == 1 and lines[0].startswith("error: cannot read ") and "adapter_config.json" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_missing_adapter_is_answered_before_torch_loads(tmp_path):
    code = ("import sys; from qlora_ga.export import main; code = main(sys.argv[1:]); "
            "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded'); sys.exit(code)")
    proc = subprocess.run([sys.executable, "-c", code, "--adapter", str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120, cwd=REPO,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"))
    assert proc.returncode == 2 and proc.stdout.strip() == "torch not loaded", (proc.stdout, proc.stderr)
    assert proc.stderr.strip() == (f"error: adapter folder '{tmp_path / 'missing'}' does not exist: pass the folder written "
                                   "by the trainer or save_adapter")


@pytest.mark.parametrize("flags, message", [
    (["--gguf", "q5_x"], "unknown GGUF type 'q5_x'"),
    (["--llama-cpp", "somewhere"], "--llama-cpp only applies with --gguf"),
    (["--dtype", "bf16"], "--dtype, --merge-base and --base only apply with --merge or --gguf"),
    (["--merge", "--max-shard-size", "2XB"], "cannot parse size '2XB'"),
])
def test_a_wrong_flag_is_named_before_a_missing_adapter(tmp_path, capsys, flags, message):
    """The flags are checked first (as finetune checks its options before its files)."""
    assert export.main(["--adapter", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {message}"), err


def test_a_system_error_is_one_line_naming_the_file():
    import errno

    from qlora_ga.errors import system_error_line

    assert system_error_line(OSError(errno.ENOSPC, "No space left on device", "/out/x")) == \
        "error: No space left on device (/out/x)"
    assert system_error_line(OSError("cannot map the file")) == "error: cannot map the file"
    assert system_error_line(MemoryError()) == "error: MemoryError"


def test_base_tensor_dtypes_come_from_the_shard_headers(tmp_path):
    """Every dtype a checkpoint can hold is read from the header as the tensor's own torch dtype (no data read)."""
    from safetensors.torch import save_file

    from qlora_ga.export.base import HEADER_DTYPES, base_tensors

    tensors = {f"t{i}": torch.zeros(2, 3, dtype=dt) for i, dt in enumerate(HEADER_DTYPES.values())}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    found = base_tensors(tmp_path)
    assert {k: (v.dtype, list(v.shape)) for k, v in found.items()} == {k: (t.dtype, [2, 3]) for k, t in tensors.items()}


# ----------------------------------------------------------------------------- what export.py's --out may be


def _tree(folder: Path) -> dict:
    """Every file below ``folder`` with its bytes (to show that nothing in it changed)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(capsys, *argv) -> str:
    """Run export.py's main, which must refuse with one error line; that line."""
    assert export.main(list(map(str, argv))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err.strip()


def test_export_out_never_replaces_a_run_a_model_or_foreign_files(trained, tiny_model_dir, tmp_path, capsys):
    run = tmp_path / "run"  # a training run's folder, its final adapter inside
    shutil.copytree(trained["plain"], run / "adapter")
    (run / "checkpoints" / "step-2").mkdir(parents=True)
    (run / "checkpoints" / "step-2" / "optimizer.pt").write_bytes(b"optimizer state")
    (run / "run_config.yaml").write_text("rank: 4\n")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    before = {d: _tree(d) for d in (run, base, other)}

    err = _refused(capsys, "--adapter", run / "adapter", "--out", run, "--merge", "--base", base)
    assert err == (f"error: --out '{run}' would replace the adapter or model folder (it holds the adapter folder "
                   f"'{run / 'adapter'}'): choose another --out")
    err = _refused(capsys, "--adapter", trained["plain"], "--base", base, "--out", base, "--merge")
    assert err == (f"error: --out '{base}' would replace the adapter or model folder (it is the base model folder "
                   f"'{base}'): choose another --out")
    err = _refused(capsys, "--adapter", trained["plain"], "--base", base, "--out", base / "merged", "--merge")
    assert err == f"error: --out '{base / 'merged'}' is inside the base model folder '{base}': choose another --out"
    err = _refused(capsys, "--adapter", run / "adapter", "--out", run / "adapter" / "copy")
    assert err == (f"error: --out '{run / 'adapter' / 'copy'}' is inside the adapter folder '{run / 'adapter'}': "
                   "choose another --out")
    err = _refused(capsys, "--adapter", trained["plain"], "--out", run)
    assert err == f"error: --out '{run}' holds a training run (run_config.yaml, checkpoints, metrics.jsonl): choose another --out"
    err = _refused(capsys, "--adapter", trained["plain"], "--out", base, "--merge")  # a model, not the merge's base
    assert err == f"error: --out '{base}' holds a model (config.json, model.safetensors): choose another --out"
    err = _refused(capsys, "--adapter", trained["plain"], "--out", other)
    assert err == f"error: --out '{other}' holds files qlora-ga did not write (notes.txt): choose another --out"
    err = _refused(capsys, "--adapter", trained["plain"], "--out", other / "notes.txt")
    assert err == f"error: --out '{other / 'notes.txt'}' is a file, not a folder: choose another --out"
    assert {d: _tree(d) for d in (run, base, other)} == before
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]

    empty = tmp_path / "empty"  # an empty folder is fine
    empty.mkdir()
    assert export.main(["--adapter", str(trained["plain"]), "--out", str(empty)]) == 0
    assert (empty / "adapter_model.safetensors").is_file()


def test_export_overwrite_replaces_only_an_earlier_export_of_the_same_kind(trained, tmp_path, capsys):
    out = tmp_path / "out"
    assert export.main(["--adapter", str(trained["plain"]), "--out", str(out)]) == 0
    assert export.read_metadata(out)["format"] == "qlora-ga-adapter"  # the marker of an adapter export
    err = _refused(capsys, "--adapter", trained["res"], "--out", out)
    assert err == f"error: --out '{out}' holds an earlier adapter export: pass --overwrite to replace it, or choose another --out"
    assert export.read_metadata(out)["has_residual"] is False  # untouched
    err = _refused(capsys, "--adapter", trained["res"], "--out", out, "--merge", "--overwrite")
    assert err == f"error: --out '{out}' holds an adapter export, not a merged-model export: choose another --out"
    assert export.main(["--adapter", str(trained["res"]), "--out", str(out), "--overwrite"]) == 0
    assert export.read_metadata(out)["has_residual"] is True
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    err = _refused(capsys, "--adapter", trained["plain"], "--out", out, "--overwrite")
    assert err == (f"error: --out '{out}' holds an earlier adapter export and other files that --overwrite would delete "
                   "(notes.txt): move them away or choose another --out")
    assert (out / "notes.txt").read_text() == "mine" and export.read_metadata(out)["has_residual"] is True
    merged = tmp_path / "merged"
    for _ in range(2):  # written, then replaced
        assert export.main(["--adapter", str(trained["res"]), "--out", str(merged), "--merge", "--overwrite"]) == 0
    assert export.read_metadata(merged)["format"] == "qlora-ga-merged"


def test_ctrl_c_during_a_merge_is_one_line_and_writes_nothing(trained, tmp_path, capsys, monkeypatch):
    from qlora_ga.export import merge as export_merge

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_merge, "_write_shards", interrupted)
    try:
        code = export.main(["--adapter", str(trained["res"]), "--out", str(tmp_path / "merged"), "--merge"])
    except KeyboardInterrupt:
        pytest.fail("the KeyboardInterrupt escaped export.py's main")
    assert code == 130
    assert capsys.readouterr().err == "interrupted: nothing was written to --out\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("broken", ["adapter_model.safetensors", "residual.safetensors"])
def test_truncated_adapter_file_is_one_line(trained, tmp_path, capsys, broken):
    src = tmp_path / "adapter"
    shutil.copytree(trained["plain"], src)
    path = src / broken
    if broken == "residual.safetensors":  # a training checkpoint's residual beside a rank-r adapter
        save_file({"x.A0": torch.zeros(4, 64)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a copy cut short
    for mode in ([], ["--merge"]):
        err = _refused(capsys, "--adapter", src, "--out", tmp_path / "out", *mode)
        assert err.startswith(f"error: '{path}' is truncated or corrupt (Error while deserializing header: ")
        assert err.endswith("): export or copy it again")
    assert not (tmp_path / "out").exists()
