"""--compile (qlora_ga.compile): compiled training is the eager run, step for step, with the LoRA-GA residual and
gradient checkpointing, on padding-free rows (each block's parts compile around the eager per-sequence attention;
whole padded blocks with the fused LoRA linears: tests/test_fused.py); graph breaks are counted (none on Llama,
Qwen2, Gemma 2); a backend that fails falls back to eager, never a crash.

The suite compiles with ``aot_eager`` (the same dynamo graphs and AOT autograd, no code generation: seconds
instead of minutes on a 2-core CPU); inductor's numbers are in docs/RESULTS.md (benchmarks/bench_step.py --compile)."""

import pytest

from qlora_ga.estimate import gradient_pass, svd_reducer
from qlora_ga.init import init_adapters
from qlora_ga.metrics import read_metrics
from qlora_ga.model import load_model
from qlora_ga.testing import assert_close_rel, random_examples
from qlora_ga.train import TrainSettings, train


def _run(model_dir, factors, tmp_path, name, **kw):
    model, tok = load_model(model_dir)
    pm = init_adapters(model, factors, method="lora-ga", rank=4)
    s = TrainSettings(batch_size=4, grad_accum=1, lr=1e-3, max_steps=5, optim="adamw", **kw)
    summary = train(pm, tok, random_examples(n=20, seed=1), [], s, tmp_path / name, progress=False)
    losses = [r["loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 5
    return losses, summary, pm


def test_compiled_training_equals_eager_step_for_step(tiny_model_dir, factors, tmp_path, monkeypatch):
    """Padding-free rows (each block's parts compiled around the per-sequence attention); whole padded blocks, with the
    fused LoRA linears traced into them: tests/test_fused.py."""
    padding_free = True
    monkeypatch.setenv("QLORA_GA_COMPILE_BACKEND", "aot_eager")
    eager, _, _ = _run(tiny_model_dir, factors, tmp_path, "eager", padding_free=padding_free)
    comp, summary, pm = _run(tiny_model_dir, factors, tmp_path, "compiled", padding_free=padding_free, compile=True)
    assert_close_rel(comp, eager, 1e-5, "per-step losses")  # measured: equal at the metrics' 6 decimals
    rep = summary["compile"]
    assert rep["blocks"] == 3 and rep["backend"] == "aot_eager" and rep["graphs"] >= 1 and rep["graph_breaks"] == 0, rep
    # padding-free: the per-sequence attention stays eager, each block's other parts compile
    assert rep["parts"] != "block"
    # after training the blocks are eager again (evaluation, generation and export)
    assert all(layer._compiled_call_impl is None for layer in pm.get_base_model().model.layers)


def test_a_backend_that_fails_falls_back_to_eager(tiny_model_dir, factors, tmp_path, monkeypatch, capsys):
    import torch._dynamo

    @torch._dynamo.register_backend(name="qlora_ga_test_broken")
    def broken(gm, example_inputs):
        raise RuntimeError("this backend cannot compile anything")

    monkeypatch.setenv("QLORA_GA_COMPILE_BACKEND", "qlora_ga_test_broken")
    eager, _, _ = _run(tiny_model_dir, factors, tmp_path, "eager", padding_free=False)
    comp, summary, _ = _run(tiny_model_dir, factors, tmp_path, "broken", padding_free=False, compile=True)
    assert comp == eager  # the same eager computation
    assert summary["compile"]["backend"] == "qlora_ga_test_broken" and summary["compile"]["graphs"] == 0
    warning = [line for line in capsys.readouterr().out.splitlines() if "--compile" in line]
    assert len(warning) == 1 and warning[0].startswith("warning: --compile compiled nothing with qlora_ga_test_broken")


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_other_families_compile_with_no_graph_break(tmp_path, monkeypatch, family):
    """Qwen2 (per-sequence attention: each block's parts) and Gemma 2 (eager attention, soft-capping: whole blocks),
    compiled with the fused LoRA linears; measured 0 graph breaks also on Phi-3 and Mistral (RESULTS 14)."""
    from qlora_ga.testing import make_tiny_model

    monkeypatch.setenv("QLORA_GA_COMPILE_BACKEND", "aot_eager")
    d = make_tiny_model(tmp_path / family, family=family, layers=2)
    model, tok = load_model(d)
    G = gradient_pass(model, random_examples(n=4, seed=2), lambda n, g: g.clone(), micro_batch_size=4,
                      pad_token_id=tok.pad_token_id, progress=False)
    factors = {n: svd_reducer(8)(n, g) for n, g in G.items()}
    model, tok = load_model(d)
    pm = init_adapters(model, factors, method="lora-ga", rank=4)
    s = TrainSettings(batch_size=4, grad_accum=1, lr=1e-3, max_steps=2, optim="adamw", compile=True, fused_lora=True)
    rep = train(pm, tok, random_examples(n=8, seed=1), [], s, tmp_path / "run", progress=False)["compile"]
    assert rep["graphs"] >= 1 and rep["graph_breaks"] == 0, rep
    assert (rep["parts"] == "block") is (family == "gemma2")
