"""Core engine: 4-bit loading, the serial gradient pass, the inits and the residual."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

import qlora_ga.estimate.engine as gradient_mod
from qlora_ga import QloraGaError, estimate_factors, gradient_pass, init_adapters, load_model
from qlora_ga.estimate import Factors, PassReport, make_micro_batches, truncated_svd
from qlora_ga.init import lora_layers
from qlora_ga.arch import find_decoder_layers, resolve_targets, target_linears
from qlora_ga.residual import iter_residuals
from qlora_ga.testing import assert_close_rel, dequantized_reference, make_tiny_model, train_steps


def make_examples(vocab, lengths=(5, 9, 13, 7, 20, 3, 11), seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for L in lengths:
        ids = torch.randint(3, vocab, (L,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (L // 3) + ids[L // 3 :]})
    return out


def reference_grads(model_dir, qmodel, examples):
    """Plain autograd on an fp32 copy whose target weights are the 4-bit model's dequantized weights."""
    ref, r = dequantized_reference(model_dir, qmodel)
    b = make_micro_batches(examples, len(examples))[0]
    logits = ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
    labels = b["labels"][:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum") / (labels != -100).sum()
    loss.backward()
    return {n: r[n].weight.grad for n in r}, float(loss.detach())


@pytest.fixture(scope="module")
def qmodel(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    return model, tok


def rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


# ------------------------------------------------------------------ loading


def test_load_quantizes_every_target_linear(qmodel):
    import bitsandbytes as bnb

    model, tok = qmodel
    lins = target_linears(model)
    assert len(lins) == 3 * 7
    for name, m in lins.items():
        assert isinstance(m, bnb.nn.Linear4bit), name
        assert m.weight.quant_type == "nf4" and m.weight.compress_statistics  # NF4 + double quant
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)
    assert tok.pad_token is not None
    assert find_decoder_layers(model)[0] == "model.layers"


def test_a_gguf_conversion_is_reused_only_for_the_same_file_and_transformers(tmp_path, monkeypatch):
    import transformers

    from qlora_ga.model import gguf_cache_dir

    monkeypatch.setenv("QLORA_GA_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + bytes(60))
    first = gguf_cache_dir(f)
    assert gguf_cache_dir(f) == first and first.parent == tmp_path / "cache" / "gguf" and first.name.startswith("m-")
    monkeypatch.setattr(transformers, "__version__", transformers.__version__ + ".post1")
    newer = gguf_cache_dir(f)  # a new converter: converted again
    assert newer != first
    os.utime(f, ns=(0, f.stat().st_mtime_ns + 10**9))  # the file replaced (e.g. downloaded again)
    assert gguf_cache_dir(f) not in (first, newer)


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(QloraGaError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(QloraGaError, match="does not exist"):
        load_model(str(tmp_path / "nope.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(QloraGaError, match="config.json"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(QloraGaError, match="cannot load model"):
        load_model("no-such-org/no-such-model-xyz")


# ------------------------------------------------------------------ gradient pass


def test_gradient_matches_autograd_for_every_micro_batch_size(tiny_model_dir, qmodel):
    model, tok = qmodel
    examples = make_examples(len(tok))
    ref, ref_loss = reference_grads(tiny_model_dir, model, examples)
    for mbs in (1, 3, len(examples)):
        report = PassReport()
        G = gradient_pass(model, examples, lambda n, g: g.clone(), micro_batch_size=mbs,
                          pad_token_id=tok.pad_token_id, progress=False, report=report)
        assert set(G) == set(ref)
        for n in ref:
            assert_close_rel(G[n], ref[n], 1e-4, f"G, micro-batch {mbs}")  # measured 1.4e-6
        assert_close_rel(report.loss, ref_loss, 1e-5, "loss")
        assert report.n_label_tokens == sum(sum(1 for x in e["labels"][1:] if x != -100) for e in examples)


def test_strided_state_store_gives_the_same_gradient(tmp_path):
    model, tok = load_model(make_tiny_model(tmp_path, layers=6))
    examples = make_examples(len(tok), lengths=(5, 9, 13, 7))
    full_report = PassReport()
    full = gradient_pass(model, examples, lambda n, g: g.clone(), micro_batch_size=2, progress=False, report=full_report)
    per_layer = sum(b["input_ids"].numel() for b in make_micro_batches(examples, 2)) * 64 * 4
    assert full_report.state_bytes_per_layer == per_layer and full_report.state_stride == 1
    fixed = full_report.state_fixed_bytes  # the layers' kept keyword arguments (masks, rotary cos/sin)
    assert fixed > 0
    report = PassReport()
    strided = gradient_pass(model, examples, lambda n, g: g.clone(), micro_batch_size=2, progress=False,
                            state_budget_bytes=fixed + 5 * per_layer, report=report)
    # 6 layers + the dL/dh store in 5 layers' worth: keep every 2nd (3), recompute 1, plus dL/dh
    assert report.state_stride == 2
    for n in full:
        assert_close_rel(strided[n], full[n], 1e-6, "G")  # the same computation: measured 0
    with pytest.raises(QloraGaError, match="lower --init-samples"):
        gradient_pass(model, examples, lambda n, g: g, micro_batch_size=2, progress=False,
                      state_budget_bytes=fixed + 4 * per_layer)


def test_pass_never_holds_more_than_one_block_of_gradients(qmodel, monkeypatch):
    model, tok = qmodel
    import weakref

    live, peak, seen = [0], [0], []

    def counting_buffer(ledger, shape, device):
        g = torch.zeros(shape, dtype=torch.float32, device=device)
        nbytes = g.numel() * 4
        live[0] += nbytes
        peak[0] = max(peak[0], live[0])
        seen.append(nbytes)

        def free():
            live[0] -= nbytes

        weakref.finalize(g, free)
        return g

    monkeypatch.setattr(gradient_mod, "new_grad_buffer", counting_buffer)
    report = PassReport()
    kept = []
    gradient_pass(model, make_examples(len(tok)), lambda n, g: kept.append(g.shape) or None,
                  micro_batch_size=3, progress=False, report=report)
    block_bytes = sum(m.out_features * m.in_features * 4 for m in target_linears(find_decoder_layers(model)[1][0]).values())
    assert len(kept) == 21 and sum(seen) == 3 * block_bytes
    assert peak[0] == block_bytes  # exactly one block's fp32 gradients alive at any time
    assert live[0] == 0  # and all of them freed at the end


def test_pass_leaves_the_model_as_it_was(qmodel):
    model, tok = qmodel
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    model.train()

    def boom(name, g):
        raise RuntimeError("reduce failed")

    with pytest.raises(RuntimeError, match="reduce failed"):
        gradient_pass(model, make_examples(len(tok)), boom, progress=False)
    assert model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == hooks
    assert all(p.grad is None for p in model.parameters())
    model.eval()


def test_pass_rejects_no_label_tokens_and_non_finite_gradients(qmodel):
    model, tok = qmodel
    masked = [{"input_ids": [5, 6, 7], "labels": [-100, -100, -100]}]
    with pytest.raises(QloraGaError, match="no label tokens"):
        gradient_pass(model, masked, lambda n, g: g, progress=False)
    with pytest.raises(QloraGaError, match="empty"):
        gradient_pass(model, [], lambda n, g: g, progress=False)
    # NaN in one layer's norm weight poisons the gradients below it: the error names a module
    norm = model.model.layers[1].post_attention_layernorm.weight
    saved = norm.detach().clone()
    with torch.no_grad():
        norm[0] = float("nan")
    try:
        with pytest.raises(QloraGaError, match=r"(gradient of model\.layers\.\d\.\S+ is not finite|loss is not finite)") as e:
            gradient_pass(model, make_examples(len(tok)), lambda n, g: g, progress=False)
        assert "\n" not in str(e.value)
    finally:
        with torch.no_grad():
            norm.copy_(saved)


def test_rank_errors(qmodel):
    model, tok = qmodel
    ex = make_examples(len(tok))
    for bad in (0, -3):
        with pytest.raises(QloraGaError, match="positive integer"):
            estimate_factors(model, ex, rank=bad, progress=False)
    # k_proj is 32 x 64: LoRA-GA needs 2r <= 32
    with pytest.raises(QloraGaError, match=r"too large for model\.layers\.\d\.self_attn\.k_proj.*lower --rank"):
        estimate_factors(model, ex, rank=17, progress=False)


def test_lowrank_svd_matches_exact_subspace():
    torch.manual_seed(0)
    G = torch.randn(96, 8) @ torch.diag(torch.logspace(0, -2, 8)) @ torch.randn(8, 160) + 1e-5 * torch.randn(96, 160)
    U, S, V = truncated_svd(G, 4, "lowrank")
    Ue, Se, Ve = truncated_svd(G, 4, "exact")
    assert_close_rel(S, Se, 1e-4, "S")
    assert_close_rel(U @ U.T, Ue @ Ue.T, 1e-4, "U U^T")  # measured 1e-6
    assert_close_rel(V @ V.T, Ve @ Ve.T, 1e-4, "V V^T")  # measured 1.4e-6


# ------------------------------------------------------------------ inits + residual


def ref_lora_ga(G, r, gamma):
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    c = G.shape[0] ** 0.25 / gamma**0.5
    return Vh[:r] * c, U[:, r : 2 * r] * c  # A0, B0


def ref_lora_ga_peft(G, r, gamma):
    """PEFT 0.21's LoRA-GA (LoraGAConfig defaults: ArB2r, stable): A0 unscaled, B0 = U[:, r:2r] S[r:2r] c."""
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    c = G.shape[0] ** 0.25 / gamma**0.5
    return Vh[:r], U[:, r : 2 * r] @ torch.diag(S[r : 2 * r]) * c


def ref_lora_one(G, r, gamma):
    U, S, Vh = torch.linalg.svd(-G, full_matrices=False)
    w = torch.sqrt(S[:r] / S[0]) / gamma**0.5
    return w[:, None] * Vh[:r], U[:, :r] * w


@pytest.fixture()
def fresh_model(tiny_model_dir):
    return load_model(tiny_model_dir)


def _grads(model, examples):
    return gradient_pass(model, examples, lambda n, g: g.clone(), micro_batch_size=4, progress=False)


@pytest.mark.parametrize("method", ["lora-ga", "lora-ga-sign", "lora-ga-peft", "lora-one"])
def test_init_equals_reference_formula(fresh_model, method):
    model, tok = fresh_model
    ex = make_examples(len(tok))
    G = _grads(model, ex)
    r = 4
    factors = estimate_factors(model, ex, rank=r, svd="exact", micro_batch_size=4, progress=False,
                               transform=torch.sign if method == "lora-ga-sign" else None)
    pm = init_adapters(model, factors, method=method, rank=r, alpha=8)
    gamma = 128.0 if method == "lora-one" else 16.0
    for name, layer in lora_layers(pm).items():
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        if method == "lora-one":
            A0, B0 = ref_lora_one(G[name], r, gamma)
            assert_close_rel(B @ A, B0 @ A0, 1e-4, "B A")  # sign-invariant product
        else:
            target = torch.sign(G[name]) if method == "lora-ga-sign" else G[name]
            A0, B0 = (ref_lora_ga_peft if method == "lora-ga-peft" else ref_lora_ga)(target, r, gamma)
            # LoRA-GA pairs U[:, r:2r] with V[:, :r]: B@A depends on the SVD's sign choices, the spans do not
            assert_close_rel(A.T @ A, A0.T @ A0, 1e-4, "A^T A")
            assert_close_rel(B @ B.T, B0 @ B0.T, 1e-4, "B B^T")  # measured 3e-7
        assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(r))  # rsLoRA
    assert len(list(iter_residuals(pm))) == (0 if method == "lora-one" else 21)


def test_lora_ga_peft_equals_peft_own_lora_ga_init(tiny_model_dir, monkeypatch):
    """``--init lora-ga-peft`` against PEFT 0.21's own code (``init_lora_weights="lora_ga"``) fed the same G.

    PEFT takes a randomized ``torch.svd_lowrank``; both sides get the same exact SVD here (with our
    canonical signs), so the factors must agree to the last bits, not just up to the SVD's sign choices."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import LoraGAConfig

    def exact_svd(G, q=6, niter=2, M=None):  # ours: exact, with the canonical signs
        return truncated_svd(G, q, "exact")

    monkeypatch.setattr(torch, "svd_lowrank", exact_svd)
    r, alpha = 4, 8
    model, tok = load_model(tiny_model_dir, quantize=False)  # PEFT refuses LoRA-GA on a 4-bit base
    G = _grads(model, make_examples(len(tok)))
    for name, mod in target_linears(model).items():
        mod._peft_loraga_grad = G[name].clone()
    peft_pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, use_rslora=True, target_modules=list(resolve_targets(model)),
                                               init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig()))
    ours_model, _ = load_model(tiny_model_dir, quantize=False)
    factors = {n: Factors(*truncated_svd(g, 2 * r, "exact"), tuple(g.shape), float(g.norm())) for n, g in G.items()}
    ours = init_adapters(ours_model, factors, method="lora-ga-peft", rank=r, alpha=alpha)
    theirs = lora_layers(peft_pm)
    assert set(theirs) == set(G) and len(G) == 21
    for name, layer in lora_layers(ours).items():
        for which in ("lora_A", "lora_B"):
            assert_close_rel(getattr(layer, which)["default"].weight, getattr(theirs[name], which)["default"].weight,
                             1e-5, which)  # measured 1.2e-7
        assert layer.scaling["default"] == theirs[name].scaling["default"]
    # unlike PEFT (which rewrites W), the base is untouched and the residual keeps the function
    assert len(list(iter_residuals(ours))) == 21


def test_vanilla_inits_start_at_zero(fresh_model):
    model, tok = fresh_model
    pm = init_adapters(model, None, method="gaussian", rank=4, alpha=8)
    for layer in lora_layers(pm).values():
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
        assert torch.count_nonzero(layer.lora_A["default"].weight) > 0
        assert layer.scaling["default"] == 2.0  # alpha / r
    with pytest.raises(QloraGaError, match="unknown init"):
        init_adapters(model, None, method="pissa")


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_residual_keeps_the_function_exactly_and_only_adapters_train(fresh_model):
    model, tok = fresh_model
    ex = make_examples(len(tok))
    batch = make_micro_batches(ex, len(ex), tok.pad_token_id)[0]
    before = _logits(model, batch)
    bytes_before = {n: m.weight.data.clone() for n, m in target_linears(model).items()}
    factors = estimate_factors(model, ex, rank=4, micro_batch_size=3, progress=False)
    pm = init_adapters(model, factors, method="lora-ga", rank=4, alpha=16)
    # the adapter really is non-zero, and the model computes exactly what the 4-bit base computed
    assert all(torch.count_nonzero(layer.lora_B["default"].weight) > 0 for layer in lora_layers(pm).values())
    after = _logits(pm, batch)
    assert_close_rel(after, before, 1e-5, "logits at init")  # measured 0
    with pm.disable_adapter():
        assert torch.equal(_logits(pm, batch), before)
    # train a few steps: loss goes down, only adapter parameters move, 4-bit bytes and residual do not
    trainable = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in pm.named_parameters() if not p.requires_grad and p.dtype.is_floating_point}
    residual = {n: (a.clone(), b.clone()) for n, _, a, b in iter_residuals(pm)}
    assert trainable and all("lora_" in n for n in trainable)
    losses = train_steps(pm, batch, steps=8, lr=2e-3)
    assert losses[-1] < losses[0]
    assert all(not torch.equal(p, trainable[n]) for n, p in pm.named_parameters() if n in trainable)
    assert all(torch.equal(p, frozen[n]) for n, p in pm.named_parameters() if n in frozen)
    for n, m in target_linears(pm.base_model.model).items():
        assert torch.equal(m.base_layer.weight.data if hasattr(m, "base_layer") else m.weight.data, bytes_before[n])
    for n, _, a, b in iter_residuals(pm):
        assert torch.equal(a, residual[n][0]) and torch.equal(b, residual[n][1])


def test_lora_one_moves_the_function_by_a_gradient_step(fresh_model):
    model, tok = fresh_model
    ex = make_examples(len(tok))
    batch = make_micro_batches(ex, len(ex), tok.pad_token_id)[0]
    with torch.no_grad():
        loss0 = float(model(**batch).loss)
    factors = estimate_factors(model, ex, rank=4, micro_batch_size=3, progress=False)
    pm = init_adapters(model, factors, method="lora-one", rank=4, alpha=64, gamma=1.0)
    with torch.no_grad():
        loss1 = float(pm(**batch).loss)
    assert loss1 < loss0  # a step along -G lowers the sample loss


# ------------------------------------------------------------------ the real SmolLM2 GGUF


def test_smollm2_gguf_gradient_pass_and_init(tmp_path):
    from qlora_ga.model import default_model_path

    # the suite's cache ($QLORA_GA_CACHE): the GGUF's conversion is made here on a cold cache (a clean clone: CI, where
    # this is the first test to load it) and shared with test_gguf.py's runs; on a warm cache it is read back
    model, tok = load_model(default_model_path())
    assert len(find_decoder_layers(model)[1]) == 30
    msgs = ["What is 2 + 3?", "Name a colour.", "Count to three."]
    answers = ["2 + 3 = 5.", "Blue.", "One, two, three."]
    ex = []
    for q, a in zip(msgs, answers):
        p = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        pi, ai = tok(p, add_special_tokens=False).input_ids, tok(a, add_special_tokens=False).input_ids + [tok.eos_token_id]
        ex.append({"input_ids": pi + ai, "labels": [-100] * len(pi) + ai})
    batch = make_micro_batches(ex, 3, tok.pad_token_id)[0]
    before = _logits(model, batch)
    report = PassReport()
    factors = estimate_factors(model, ex, rank=8, micro_batch_size=2, progress=False, report=report)
    assert len(factors) == 30 * 7 and report.n_label_tokens > 0
    assert all(torch.isfinite(f.S).all() and f.S[0] > 0 for f in factors.values())
    pm = init_adapters(model, factors, method="lora-ga", rank=8, alpha=16)
    assert_close_rel(_logits(pm, batch), before, 1e-5, "logits at init")  # measured 0
    # the adapter names the .gguf file (portable), and the merge finds the weights through the cache
    import json

    from qlora_ga.export import merge_export, save_adapter

    save_adapter(pm, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == default_model_path()
    stats = merge_export(tmp_path / "adapter", tmp_path / "merged", dtype="bf16")
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in cfg and stats.tensors_merged == 30 * 7


# ------------------------------------------------------------------ lora-ga-adam (the blog's "hard-core" Adam variant)


def test_adam_alignment_objective_matches_its_formula():
    from qlora_ga.init import adam_alignment

    torch.manual_seed(0)
    G, A, B = torch.randn(12, 20), torch.randn(3, 20), torch.randn(12, 3)
    M = B @ torch.sign(B.T @ G) + torch.sign(G @ A.T) @ A
    T = torch.sign(G)
    lam = (M * T).sum() / (M * M).sum()
    objective = float(adam_alignment(G, A, B, T))
    assert_close_rel(objective, float(((lam * M - T) ** 2).mean()), 1e-5, "objective")
    lams = torch.linspace(0.5, 1.5, 11) * lam  # the fitted scalar is the minimiser
    assert all(float(((lv * M - T) ** 2).mean()) >= objective * (1 - 1e-5) for lv in lams)


def test_lora_ga_adam_improves_the_alignment_and_keeps_the_function(fresh_model):
    from qlora_ga.init import factor_reducer, lora_ga_factors

    model, tok = fresh_model
    ex = make_examples(len(tok))
    batch = make_micro_batches(ex, len(ex), tok.pad_token_id)[0]
    before = _logits(model, batch)
    G = _grads(model, ex)
    starts = estimate_factors(model, ex, rank=4, micro_batch_size=4, progress=False, svd="exact",
                              reducer=factor_reducer("lora-ga-adam", 4, svd="exact", adam_steps=60))
    assert len(starts) == 21
    improved = [f.objective_end < f.objective_start for f in starts.values()]
    assert all(f.objective_end <= f.objective_start for f in starts.values()) and sum(improved) >= 15
    for name, f in starts.items():
        A_ga, B_ga = lora_ga_factors(svd_reducer_exact(G[name], 8), 4, 16.0)
        assert_close_rel(float(f.A0.norm()), float(A_ga.norm()), 1e-4, "|A0|")
        assert_close_rel(float(f.B0.norm()), float(B_ga.norm()), 1e-4, "|B0|")
    pm = init_adapters(model, starts, method="lora-ga-adam", rank=4, alpha=16)
    assert_close_rel(_logits(pm, batch), before, 1e-5, "logits at init")
    assert len(list(iter_residuals(pm))) == 21


def svd_reducer_exact(G, k):
    from qlora_ga.estimate import svd_reducer

    return svd_reducer(k, "exact")("m", G)


def test_padding_already_inside_examples_changes_nothing(qmodel):
    model, tok = qmodel
    ex = make_examples(len(tok), lengths=(5, 9, 7))
    padded = [{"input_ids": e["input_ids"] + [tok.pad_token_id] * 4, "labels": e["labels"] + [7] * 4,
               "attention_mask": [1] * len(e["input_ids"]) + [0] * 4} for e in ex]
    a = gradient_pass(model, ex, lambda n, g: g.clone(), micro_batch_size=2, progress=False)
    b = gradient_pass(model, padded, lambda n, g: g.clone(), micro_batch_size=2, progress=False)
    for n in a:
        assert_close_rel(b[n], a[n], 1e-4, "G")  # only the summation order differs (measured 1e-6)
    with pytest.raises(QloraGaError, match="same length"):
        gradient_pass(model, [{"input_ids": [1, 2, 3], "labels": [1, 2]}], lambda n, g: g, progress=False)


# ------------------------------------------------------------------ no silent fallbacks in the init


DEAD = "model.layers.1.self_attn.v_proj"


@pytest.fixture(scope="module")
def dead_module_pass(tiny_model_dir):
    """The gradient pass with one target module whose gradient is zero: its report and every module's G."""
    from qlora_ga.estimate import svd_reducer

    model, tok = load_model(tiny_model_dir)
    # its output still reaches the logits, its gradient does not (as an unused layer, an expert no token reached)
    target_linears(model)[DEAD].register_forward_hook(lambda m, args, out: out.detach())
    G, report = {}, PassReport()

    def reduce(name, g):
        G[name] = g.clone()
        return svd_reducer(8)(name, g)

    estimate_factors(model, make_examples(len(tok)), rank=4, micro_batch_size=4, progress=False, report=report, reducer=reduce)
    return G, report


@pytest.mark.parametrize("method", ["lora-ga", "lora-ga-adam", "lora-one"])  # SVD factors + residual, direct starts, no residual
def test_a_module_without_gradient_starts_as_vanilla_lora_and_is_reported(tiny_model_dir, dead_module_pass, method):
    from qlora_ga.init import factor_reducer

    G, report = dead_module_pass
    assert report.zero_gradient_modules == [DEAD] and torch.count_nonzero(G[DEAD]) == 0
    assert report.modules[DEAD]["grad_norm"] == 0 and len(G) == 21
    reduce = factor_reducer(method, 4, adam_steps=5)
    factors = {n: reduce(n, g) for n, g in G.items()}
    model, _ = load_model(tiny_model_dir)
    torch.manual_seed(0)
    pm = init_adapters(model, factors, method=method, rank=4, alpha=16)
    assert pm.qlora_ga_init["vanilla_modules"] == [DEAD]
    x = torch.randn(2, 5, 64)
    for name, layer in lora_layers(pm).items():
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert torch.isfinite(A).all() and torch.isfinite(B).all(), name  # (LoRA-One's were NaN: S / S[0] = 0 / 0)
        if name == DEAD:  # vanilla LoRA's start (PEFT's kaiming A, B = 0): the layer computes what its base does
            assert torch.count_nonzero(B) == 0 and torch.count_nonzero(A) == A.numel()
            with torch.no_grad():
                assert torch.equal(layer(x), layer.base_layer(x))
        else:
            assert torch.count_nonzero(B) > 0, name
    assert len(list(iter_residuals(pm))) == (0 if method == "lora-one" else 21)


def test_an_init_method_without_its_registry_entry_is_an_error_not_lora_ga(fresh_model, monkeypatch):
    import qlora_ga.init as init_mod
    from qlora_ga.estimate import svd_reducer
    from qlora_ga.methods import GRADIENT_METHODS, METHODS

    # the registry and the table of defaults name the same methods, and the same ones need the gradient pass
    assert tuple(init_mod.INITS) == METHODS
    assert tuple(m for m, i in init_mod.INITS.items() if i.needs_gradient) == GRADIENT_METHODS
    model, tok = fresh_model
    g = torch.Generator().manual_seed(0)
    factors = {n: svd_reducer(8, "exact")(n, torch.randn(m.out_features, m.in_features, generator=g))
               for n, m in target_linears(model).items()}
    with pytest.raises(QloraGaError, match=r"^unknown init 'pissa': choose one of lora-ga, "):
        init_mod.init_method("pissa")
    with pytest.raises(QloraGaError, match=r"^unknown init 'lora-gaa' \(did you mean 'lora-ga'\?\)"):
        init_mod.singular_vectors_needed("lora-gaa", 4)
    # a method added to the table of defaults but not to the registry (it used to get LoRA-GA's start, unsaid)
    monkeypatch.setattr(init_mod, "METHODS", (*METHODS, "lora-new"))
    with pytest.raises(QloraGaError, match=r"^init 'lora-new' has no entry in the init registry") as e:
        init_adapters(model, factors, method="lora-new", rank=4)
    assert "\n" not in str(e.value)
    # lora-ga-adam's start is optimised inside the pass: plain SVD factors are an error (they gave LoRA-GA's start)
    with pytest.raises(QloraGaError, match=r"^init 'lora-ga-adam' computes its start inside the gradient pass"):
        init_adapters(model, factors, method="lora-ga-adam", rank=4)
    assert not lora_layers(model)  # the model was not touched
