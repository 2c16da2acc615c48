"""Tiny random models for tests, examples and the notebook's smoke run (no download needed)."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@functools.lru_cache(maxsize=1)
def _default_tiny_tokenizer():
    return make_tiny_tokenizer(None)


def make_tiny_tokenizer(corpus: list[str] | None = None, vocab_size: int = 384):
    """A byte-level BPE tokenizer trained in well under a second, with chat special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if corpus is None:
        from .data.builtin import make_arithmetic_examples

        corpus = [e["question"] + " " + e["answer"] for e in make_arithmetic_examples(200, seed=0)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


# Tiny random configs of transformers' own classes, one per supported family. Values under which a
# missing step would show: a small final-logit softcap (0.5) and a logits scale of 4 (random tiny
# models have small logits, where softcapping is nearly the identity).
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "final_logit_softcapping": 0.5, "attn_logit_softcapping": 50.0,
                                "query_pre_attn_scalar": 16, "sliding_window": 8}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16, "final_logit_softcapping": 0.5, "query_pre_attn_scalar": 16,
                                    "sliding_window": 8}),
    "phi3": ("Phi3Config", {}),
    "granite": ("GraniteConfig", {"logits_scaling": 4.0, "embedding_multiplier": 2.0, "residual_multiplier": 0.5,
                                  "attention_multiplier": 0.25}),
    "olmoe": ("OlmoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 32}),
    "qwen3_moe": ("Qwen3MoeConfig", {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                                     "moe_intermediate_size": 32}),
}


def make_tiny_model(out_dir, *, family: str = "llama", layers: int = 3, hidden: int = 64, intermediate: int = 128,
                    seed: int = 0, max_shard_size: str | None = None, tie_word_embeddings: bool = False,
                    **config) -> Path:
    """Write a random model of ``family`` (:data:`FAMILIES`; hidden 64, 4 heads, 2 kv heads) and its tokenizer;
    ``config``: more settings of the family's config class (e.g. ``sliding_window=5``)."""
    import transformers
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    tok = _default_tiny_tokenizer()  # trained once per process
    config_class, extra = FAMILIES[family]
    cfg = getattr(transformers, config_class)(**{
        "vocab_size": len(tok), "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
        "tie_word_embeddings": tie_word_embeddings, **extra, **config,
    })
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # larger than the default 0.02 init so gradients and logits are not tiny
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kw)
    tok.save_pretrained(out_dir)
    return out_dir


def dequantized_reference(model_dir, qmodel):
    """``(ref, linears)``: an fp32 copy of the model in ``model_dir`` whose target linears hold ``qmodel``'s
    dequantized 4-bit weights; only those weights require grad (``linears``: name -> linear)."""
    from .arch import dequantized_weight, target_linears
    from .model import load_model

    ref, _ = load_model(model_dir, quantize=False, device="cpu")
    q, r = target_linears(qmodel), target_linears(ref)
    with torch.no_grad():
        for n in q:
            r[n].weight.copy_(dequantized_weight(q[n]))
    for p in ref.parameters():
        p.requires_grad_(False)
    for n in r:
        r[n].weight.requires_grad_(True)
    return ref, r


def reference_gradients(model_dir, qmodel, batch: dict) -> dict[str, torch.Tensor]:
    """``{name: G}`` by plain autograd of the model's own ``forward(..., labels=...)`` loss on an fp32 copy whose
    target linears hold the 4-bit model's dequantized weights (the loss is token-weighted over ``batch``)."""
    ref, r = dequantized_reference(model_dir, qmodel)
    ref(**batch).loss.backward()
    return {n: r[n].weight.grad for n in r}


def train_steps(model, batch: dict, steps: int = 3, lr: float = 1e-2) -> list[float]:
    """``steps`` AdamW steps of ``model``'s trainable parameters on one batch (train mode, back to eval after);
    returns the losses."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        out = model(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(out.loss.detach()))
    model.eval()
    return losses


def random_examples(vocab: int = 384, n: int = 16, seed: int = 0) -> list[dict]:
    """``n`` seeded random sequences of 6-16 tokens, the first two masked from the loss."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        L = 6 + (5 * i) % 11
        ids = torch.randint(3, vocab, (L,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})
    return out


def assert_close_rel(actual, expected, rel: float, what: str = "") -> float:
    """Assert ``actual`` equals ``expected`` to within ``rel`` of the reference's scale; return that relative error.

    ``err = max|actual - expected| / max|expected|`` (for a scalar, its ``|value|``): the largest deviation over
    the largest magnitude of the reference, so a bound holds whatever the units and whichever CPU kernels (AVX2,
    AVX-512, none) did the rounding. Tensors, Python numbers and lists of numbers; a non-finite difference fails.
    With ``$QLORA_GA_MARGINS`` set, one JSON line per call (``test``, ``what``, ``err``, ``bound``) is appended to
    that file, so every test's margin can be listed.
    """
    import json
    import math
    import os

    def as64(x):
        return x.detach().to("cpu", torch.float64) if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.float64)

    a, e = as64(actual), as64(expected)
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != reference shape {tuple(e.shape)}"
    diff = (a - e).abs()
    abs_err = float(diff.max()) if diff.numel() else 0.0
    scale = float(e.abs().max()) if e.numel() else 0.0
    err = abs_err / max(scale, torch.finfo(torch.float64).tiny) if math.isfinite(abs_err) else math.inf
    path = os.environ.get("QLORA_GA_MARGINS")
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
        with open(path, "a") as f:
            f.write(json.dumps({"test": test, "what": what, "err": err, "bound": rel}) + "\n")
    assert err <= rel, (f"{what}: max|actual - expected| = {abs_err:.3g} is {err:.3g} of the reference's scale {scale:.3g}, "
                        f"above the bound {rel:g} ({err / rel:.3g} x the bound)")
    return err
