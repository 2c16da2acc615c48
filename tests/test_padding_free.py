"""Padding-free micro-batches and sequence packing: the same numbers as padded batches, per family;
attention that stays within each sequence; refusal where it would not; packed rows that resume exactly."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

from qlora_ga.attention import PACKED_SDPA
from qlora_ga.data import collate, collate_packed, padding_free_support
from qlora_ga.data.packing import best_fit_decreasing, is_flat, model_inputs
from qlora_ga.errors import QloraGaError
from qlora_ga.estimate import gradient_pass, svd_reducer
from qlora_ga.init import init_adapters
from qlora_ga.metrics import read_metrics
from qlora_ga.model import load_model
from qlora_ga.testing import make_tiny_model, random_examples
from qlora_ga.train import StepBatches, TrainSettings, step_loader, train

FAMILIES = ["llama", "gemma2", "qwen2", "phi3"]


def rel_err(actual, expected) -> float:
    """max |actual - expected| / max |expected| (the reference's scale)."""
    a, e = torch.as_tensor(actual, dtype=torch.float64), torch.as_tensor(expected, dtype=torch.float64)
    return float((a - e).abs().max()) / max(float(e.abs().max()), 1e-30)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: make_tiny_model(root / f, family=f, layers=2) for f in FAMILIES}


def _lengths_data(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        L = int(torch.randint(3, 40, (1,), generator=g))
        ids = torch.randint(3, 300, (L,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] + ids[1:]})
    return out


# ------------------------------------------------------------------ padding-free: the same numbers as padded


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_free_training_and_gradient_pass_equal_the_padded_ones(family_dirs, tmp_path, family):
    """Same micro-batches, flattened: the gradient pass's G, and from the same LoRA-GA init the per-step losses,
    eval losses and the final adapter, equal the padded run's (measured: G <= 1.1e-6, losses at their 6-decimal
    rounding; the adapter after two AdamW steps <= 3.3e-7 relative, Phi-3 2.4e-5: the per-sequence SDPA calls
    round differently from the padded batch's masked one (gradients 6e-7 apart), and Adam's first steps,
    g / (|g| + eps), turn rounding in an entry whose gradient is near zero into a share of the lr)."""
    ex = random_examples(n=16, seed=1)
    model, tok = load_model(family_dirs[family])
    ok, how = padding_free_support(model)
    assert ok, how
    # SDPA families run one attention call per sequence (no row-long dense mask); Gemma 2 stays on eager
    assert (PACKED_SDPA in how) is (family != "gemma2"), how
    G = {}
    for flat in (False, True):
        G[flat] = gradient_pass(model, ex[:7], lambda n, g: g.clone(), micro_batch_size=3, pad_token_id=tok.pad_token_id,
                                padding_free=flat, progress=False)
    assert max(rel_err(G[True][n], G[False][n]) for n in G[False]) <= 1e-5
    factors = {n: svd_reducer(8)(n, g) for n, g in G[False].items()}

    runs = {}
    for flat in (False, True):
        model, tok = load_model(family_dirs[family])
        pm = init_adapters(model, factors, method="lora-ga", rank=4)
        s = TrainSettings(batch_size=3, grad_accum=2, lr=1e-3, max_steps=2, optim="adamw", padding_free=flat)
        summary = train(pm, tok, ex[:12], ex[12:14], s, tmp_path / str(flat), progress=False)
        assert summary["padding_free"] is flat
        rows = read_metrics(tmp_path / str(flat) / "metrics.jsonl")
        runs[flat] = (rows, {k: v.detach().clone() for k, v in pm.named_parameters() if v.requires_grad})
    (rows_p, w_p), (rows_f, w_f) = runs[False], runs[True]
    assert [r["step"] for r in rows_p] == [r["step"] for r in rows_f] == [0, 1, 2]
    assert rel_err([r["loss"] for r in rows_f[1:]], [r["loss"] for r in rows_p[1:]]) <= 1e-5
    assert rel_err([rows_f[0]["eval_loss"], rows_f[-1]["eval_loss"]], [rows_p[0]["eval_loss"], rows_p[-1]["eval_loss"]]) <= 1e-5
    assert max(rel_err(w_f[k], w_p[k]) for k in w_p) <= 2.5e-4


def test_packed_sdpa_segments_follow_the_position_ids_even_refilled_in_place():
    """The row's cut is cached for the layers of one forward; a position buffer refilled in place is cut anew."""
    from qlora_ga.attention import _segments

    pos = torch.arange(12)[None].clone()
    assert _segments(pos) == [[(0, 12)]] and _segments(pos) is _segments(pos)
    pos[0, 6:] = torch.arange(6)
    assert _segments(pos) == [[(0, 6), (6, 12)]]
    assert _segments(torch.tensor([[0, 1, 0, 0, 1, 2], [0, 1, 2, 3, 0, 1]])) == [[(0, 2), (2, 3), (3, 6)], [(0, 4), (4, 6)]]


def test_packed_sdpa_equals_the_dense_mask_with_a_sliding_window(tmp_path):
    """qlora_ga.attention's per-sequence SDPA against transformers' own dense block-diagonal mask on one flattened
    row, with a sliding window shorter than the sequences (Qwen2, window 5): the same logits and gradients."""
    from qlora_ga.attention import set_attention

    d = make_tiny_model(tmp_path / "qwen2sw", family="qwen2", layers=2, use_sliding_window=True, sliding_window=5,
                        max_window_layers=0)
    model, tok = load_model(d)
    assert set(model.config.layer_types) == {"sliding_attention"}
    ex = [e for e in random_examples(n=6, seed=3) if len(e["input_ids"]) > 6][:3]
    batch = model_inputs(collate_packed([ex], tok.pad_token_id))
    out = {}
    for impl in ("sdpa", PACKED_SDPA):
        set_attention(model, impl)
        emb = model.get_input_embeddings()
        emb.weight.requires_grad_(True)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        (g,) = torch.autograd.grad(logits.float().pow(2).mean(), emb.weight)
        out[impl] = (logits.detach(), g)
        emb.weight.requires_grad_(False)
    assert rel_err(out[PACKED_SDPA][0], out["sdpa"][0]) <= 1e-5  # measured 2e-7
    assert rel_err(out[PACKED_SDPA][1], out["sdpa"][1]) <= 1e-5
    set_attention(model, "sdpa")
    # the window really cuts these sequences (else the test would not test it): without it the logits differ
    model.config.sliding_window = 10_000
    for layer in model.model.layers:
        layer.self_attn.sliding_window = 10_000
    assert rel_err(model(**{k: v for k, v in batch.items() if k != "labels"}).logits, out["sdpa"][0]) > 1e-3


def test_flattened_micro_batch_has_no_padding_and_the_same_label_tokens():
    ex = random_examples(n=5, seed=2)
    padded, flat = collate(ex, 0), StepBatches(ex, TrainSettings(batch_size=5, grad_accum=1), 0, flat=True).collate(ex)
    assert is_flat(flat) and flat["input_ids"].shape == (1, sum(len(e["input_ids"]) for e in ex))
    assert int((flat["labels"][:, 1:] != -100).sum()) == int((padded["labels"][:, 1:] != -100).sum())
    starts = (flat["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert starts == [0] + list(torch.tensor([len(e["input_ids"]) for e in ex]).cumsum(0)[:-1].tolist())
    assert (flat["labels"][0, starts] == -100).all()  # nothing predicts a sequence's first token across a boundary
    assert model_inputs(flat)["use_cache"] is False and "use_cache" not in model_inputs(padded)


# ------------------------------------------------------------------ refusals


def test_attention_that_would_cross_sequences_is_refused(family_dirs, tmp_path):
    """An attention implementation without transformers' packed mask (one registered by the user, here plain SDPA),
    and a family whose layers mix tokens whatever the mask (Lfm2's convolutions), are refused with the reason;
    a flattened row really would leak through both. Padding-free then falls back to padding; packing is an error."""
    import transformers
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from qlora_ga.data.packing import PROBE_TOL, _probe

    AttentionInterface.register("user_sdpa", sdpa_attention_forward)
    model = AutoModelForCausalLM.from_pretrained(family_dirs["llama"], attn_implementation="user_sdpa")
    ok, why = padding_free_support(model)
    assert not ok and "'user_sdpa'" in why and "no packed-sequence mask" in why
    assert _probe(model) > 0.1  # it would: a sequence's logits change by O(1) after another one in the row
    tok = transformers.AutoTokenizer.from_pretrained(family_dirs["llama"])
    pm = init_adapters(model, None, method="gaussian", rank=4)
    ex = random_examples(n=4)
    s = TrainSettings(batch_size=2, grad_accum=1, lr=1e-3, max_steps=1, optim="adamw", gradient_checkpointing=False)
    said = []
    assert train(pm, tok, ex, [], s, tmp_path / "pf", progress=False, say=said.append)["padding_free"] is False
    assert said == [f"padding-free micro-batches: off, padded instead ({why})"]
    with pytest.raises(QloraGaError, match="--packing needs attention that stays within each sequence.*user_sdpa"):
        train(pm, tok, ex, [], TrainSettings(**{**s.__dict__, "packing": True}), tmp_path / "pk", progress=False)

    cfg = transformers.Lfm2Config(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, layer_types=["conv", "full_attention"])
    torch.manual_seed(0)
    lfm2 = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # weights of a trained model's scale (as make_tiny_model's), not the tiny default init
        for p in lfm2.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    ok, why = padding_free_support(lfm2)
    assert not ok and "'conv'" in why and "mix tokens along the row" in why
    assert _probe(lfm2) > 10 * PROBE_TOL[torch.float32]  # its convolution reaches across the boundary


# ------------------------------------------------------------------ packing


def test_packed_rows_give_each_sequence_its_own_loss(family_dirs):
    """Sequences packed into rows: every sequence's token losses equal that sequence run alone (block-diagonal
    attention, positions restarting; measured 1e-6 relative), and every token of it is in its row, whole."""
    model, tok = load_model(family_dirs["gemma2"])  # sliding window + softcapping: the hardest mask of the four
    ex = _lengths_data(9, seed=3)
    rows_idx = best_fit_decreasing([len(e["input_ids"]) for e in ex], 64)
    rows = [[ex[i] for i in r] for r in rows_idx]
    b = collate_packed(rows, tok.pad_token_id)
    assert b["input_ids"].shape[0] == len(rows) < len(ex)
    with torch.no_grad():
        logits = model(**model_inputs(b)).logits.float()
        for r, row in enumerate(rows):
            at = 0
            for e in row:
                n = len(e["input_ids"])
                assert b["input_ids"][r, at : at + n].tolist() == e["input_ids"]
                ids = torch.tensor([e["input_ids"]])
                alone = model(input_ids=ids).logits.float()[0]
                lab = torch.tensor(e["labels"][1:])
                want = F.cross_entropy(alone[:-1], lab, reduction="none", ignore_index=-100)
                got = F.cross_entropy(logits[r, at : at + n - 1], lab, reduction="none", ignore_index=-100)
                assert rel_err(got, want) <= 1e-4
                at += n


def test_best_fit_decreasing_packs_whole_sequences_within_the_budget():
    lengths = [int(x) for x in torch.randint(1, 100, (300,), generator=torch.Generator().manual_seed(0))]
    bins = best_fit_decreasing(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(300))  # each sequence once, none split
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    assert len(bins) <= -(-sum(lengths) // 128) * 1.05  # within 5% of the lower bound (BFD is near-optimal here)


def test_packing_order_is_a_pure_function_of_the_step_and_resumes():
    """Packed steps: the same rows for a step whatever was asked before (fresh object, any order, any start of the
    loader), across epochs; a row never holds more than max_length tokens; every sequence once per epoch."""
    data = _lengths_data(60)
    s = TrainSettings(batch_size=2, grad_accum=2, seed=5, packing=True, max_length=64)
    sb = StepBatches(data, s, 0)
    n_rows = len(sb.packed_rows(0))
    assert sorted(i for r in sb.packed_rows(0) for i in r) == list(range(60))
    steps = 2 * n_rows // 4 + 2  # beyond two epochs
    full = list(step_loader(data, s, 0, 0, steps, torch.device("cpu")))
    for start in (steps - 1, 3):
        part = list(step_loader(data, s, 0, start, steps, torch.device("cpu")))
        for a, b in zip(full[start:], part):
            assert all(torch.equal(x[k], y[k]) for x, y in zip(a["micro_batches"], b["micro_batches"]) for k in x)
            assert a["label_tokens"] == b["label_tokens"] and a["input_tokens"] == b["input_tokens"]
    for item in full:
        for b in item["micro_batches"]:
            assert b["input_ids"].shape[0] == 2 and b["input_ids"].shape[1] <= 64 and is_flat(b)
        assert item["computed_tokens"] - item["input_tokens"] < 0.25 * item["computed_tokens"]
    assert StepBatches(data, s, 0).examples(steps - 1) == sb.examples(steps - 1)
    assert StepBatches(data, TrainSettings(**{**s.__dict__, "seed": 6}), 0).examples(0) != sb.examples(0)


def test_cli_packing_resumes_exactly_and_says_the_decision(tiny_model_dir, tmp_path, capsys):
    from qlora_ga.cli import main

    def args(out, *extra):
        return ["--model", str(tiny_model_dir), "--output-dir", str(out), "--n-builtin", "24", "--max-length", "96",
                "--batch-size", "2", "--grad-accum", "2", "--init", "gaussian", "--sample-prompts", "0",
                "--max-steps", "3", "--lr", "2e-3", "--packing", *extra]

    full, part = tmp_path / "full", tmp_path / "part"
    assert main(args(full)) == 0
    out = capsys.readouterr().out
    assert "packing: on (LlamaForCausalLM, sdpa attention, one call per sequence (qlora_ga_sdpa_packed" in out
    os.environ["QLORA_GA_STOP_AFTER"] = "1"
    try:
        assert main(args(part)) == 130
    finally:
        del os.environ["QLORA_GA_STOP_AFTER"]
    assert main(args(part, "--resume")) == 0
    keys = ("step", "loss", "lr", "grad_norm")
    assert [{k: r.get(k) for k in keys} for r in read_metrics(full / "metrics.jsonl")] == \
           [{k: r.get(k) for k in keys} for r in read_metrics(part / "metrics.jsonl")]
    capsys.readouterr()
    assert main(args(part, "--resume", "--packing", "false")) == 2  # packing decides the batches: fixed on resume
    assert "packing True -> False" in capsys.readouterr().err
    assert json.loads((full / "summary.json").read_text())["packing"] is True
