"""qlora_ga.synthetic: the random-weight Llama of the benchmarks, built in NF4 layer by layer (here: the tiny shape with
one decoder layer, on the CPU)."""

import math

import bitsandbytes.functional as F
import torch

from qlora_ga.arch import dequantized_weight, target_linears
from qlora_ga.synthetic import ModelFactory, build_random_llama, llama_config, random_batch, random_sequences


def _build(quantize: bool, seed: int = 0):
    cfg = llama_config(True, torch.float32, layers=1)
    return build_random_llama(cfg, torch.device("cpu"), torch.float32, quantize=quantize, seed=seed)


def test_nf4_model_is_the_seeded_random_model_quantized_and_marked_like_a_loaded_one():
    q, q_again, ref = _build(True), _build(True), _build(False)
    linears = target_linears(q)
    assert len(linears) == 7 and q.config.num_hidden_layers == 1
    for name, mod in linears.items():
        w = mod.weight
        assert type(mod).__name__ == "Linear4bit" and w.quant_type == "nf4" and w.blocksize == 64
        assert w.quant_state.nested  # double quantization, as load_model's BitsAndBytesConfig
        # exactly the seeded weight of the unquantized model, quantized by bitsandbytes with load_model's settings
        exact = target_linears(ref)[name].weight.detach()
        packed, state = F.quantize_4bit(exact, blocksize=64, quant_type="nf4", compress_statistics=True)
        assert torch.equal(dequantized_weight(mod), F.dequantize_4bit(packed, state).float()), name
    assert q.is_loaded_in_4bit and q.config.quantization_config.bnb_4bit_quant_type == "nf4"
    assert not any(p.is_meta for p in q.parameters())
    # the same seed: the same weights, quantized or not (embeddings and norms stay as they were drawn)
    assert torch.equal(q.model.embed_tokens.weight, ref.model.embed_tokens.weight)
    for (n, a), (_, b) in zip(q.state_dict().items(), q_again.state_dict().items()):
        assert torch.equal(a, b), n
    assert not torch.equal(_build(False, seed=1).model.embed_tokens.weight, ref.model.embed_tokens.weight)


def test_factory_and_random_inputs():
    factory = ModelFactory(torch.device("cpu"), tiny=True, layers=1)
    assert factory.label == "random tiny Llama (1 layers, hidden 256) [direct]" and factory.vocab_size == 32000
    assert factory.compute_dtype == torch.float32 and factory.ref_dtype == torch.float32
    model = factory.quantized()
    batch = random_batch(2, 16, factory.vocab_size, 3, "cpu")
    assert batch["input_ids"].shape == (2, 16) and torch.equal(batch["labels"], batch["input_ids"])
    assert torch.equal(batch["input_ids"], random_batch(2, 16, factory.vocab_size, 3, "cpu")["input_ids"])
    assert int(batch["input_ids"].min()) >= 3  # past the special tokens
    with torch.no_grad():
        loss = float(model(**batch).loss)
    assert math.isfinite(loss) and abs(loss - math.log(factory.vocab_size)) < 1.0  # random weights: about uniform
    seqs = random_sequences(3, 8, factory.vocab_size, 0)
    assert len(seqs) == 3 and all(len(s["input_ids"]) == 8 and s["labels"] == s["input_ids"] for s in seqs)
