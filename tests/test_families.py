"""Every supported model family, exact end to end: G, the init, the adapter export and the merge.

A tiny random model per family (transformers' own classes). Config values make a missing step
show: Gemma's final-logit softcap is 0.5 and Granite's logits scale 4 (see qlora_ga.testing.FAMILIES).
"""

import pytest
import torch

from qlora_ga import gradient_pass, init_adapters, load_model
from qlora_ga.data import collate
from qlora_ga.export import merge_export, save_adapter
from qlora_ga.estimate import make_micro_batches, svd_reducer
from qlora_ga.arch import resolve_targets, unadapted_experts
from qlora_ga.testing import FAMILIES, assert_close_rel, make_tiny_model, reference_gradients, train_steps

SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTED = {"phi3": ("o_proj", "qkv_proj", "gate_up_proj", "down_proj"), "olmoe": SEVEN[:4], "qwen3_moe": SEVEN[:4]}
LAYERS = 2


def make_examples(vocab, lengths=(5, 9, 13, 7, 20, 3, 11)):
    g = torch.Generator().manual_seed(0)
    out = []
    for L in lengths:
        ids = torch.randint(3, vocab, (L,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (L // 3) + ids[L // 3 :]})
    return out


@torch.no_grad()
def logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_gradient_init_export_and_merge_are_exact(family, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = make_tiny_model(tmp_path / "model", family=family, layers=LAYERS)
    model, tok = load_model(model_dir)
    names = ADAPTED.get(family, SEVEN)
    assert resolve_targets(model) == names
    assert unadapted_experts(model) == ([] if family not in ("olmoe", "qwen3_moe") else [f"{model.config.architectures[0][:-len('ForCausalLM')]}Experts"])
    examples = make_examples(len(tok))
    batch = make_micro_batches(examples, len(examples), tok.pad_token_id)[0]  # one right-padded batch

    # 1. G equals autograd of the model's own loss, for two micro-batch sizes
    ref = reference_gradients(model_dir, model, batch)
    assert len(ref) == LAYERS * len(names)
    for mbs in (2, 5):
        G = gradient_pass(model, examples, lambda n, g: g.clone(), micro_batch_size=mbs, pad_token_id=tok.pad_token_id, progress=False)
        assert set(G) == set(ref)
        for n in ref:
            assert_close_rel(G[n], ref[n], 1e-4, f"G, micro-batch {mbs}")  # measured 1.5e-6

    # 2. right after a lora-ga init the logits are the 4-bit model's
    before = logits(model, batch)
    factors = {n: svd_reducer(8)(n, g) for n, g in G.items()}  # what estimate_factors does with the same G
    pm = init_adapters(model, factors, method="lora-ga", rank=4, alpha=16)
    assert_close_rel(logits(pm, batch), before, 1e-5, "logits at init")  # measured 0

    # 3. a few steps of training, then the vanilla-PEFT adapter and the merged export reproduce it
    train_steps(pm, collate(examples, tok.pad_token_id))
    trained = logits(pm, batch)
    assert float((trained - before).abs().max()) > 1e-3  # training moved the function
    save_adapter(pm, tmp_path / "adapter")
    base, _ = load_model(model_dir)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert_close_rel(logits(reloaded, batch), trained, 1e-4, "vanilla PEFT reload logits")  # measured 5e-6 (gemma3)
    merge_export(tmp_path / "adapter", tmp_path / "merged", dtype="fp32", merge_base="dequantized")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert_close_rel(logits(merged, batch), trained, 1e-4, "merged fp32 logits")


def test_a_head_the_pass_cannot_reproduce_stops_with_one_line(tiny_model_dir):
    """A causal-LM forward whose logits depend on more than the last block's output: refused, never a wrong G."""
    import types

    from qlora_ga.errors import QloraGaError

    model, tok = load_model(tiny_model_dir)
    own_forward = model.forward

    def forward(self, input_ids=None, **kw):  # a token-dependent logit bias after the LM head
        out = own_forward(input_ids=input_ids, **kw)
        out.logits = out.logits + (input_ids % 3 == 1)[:, -out.logits.shape[1]:, None].to(out.logits.dtype)
        return out

    model.forward = types.MethodType(forward, model)
    with pytest.raises(QloraGaError, match=r"cannot reproduce the logits of LlamaForCausalLM") as e:
        gradient_pass(model, make_examples(len(tok)), lambda n, g: g, progress=False)
    assert "\n" not in str(e.value)


def test_a_model_without_decoder_layers_is_a_one_line_error():
    from torch import nn

    from qlora_ga.errors import QloraGaError
    from qlora_ga.arch import find_decoder_layers

    class NoStack(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])  # a same-class list that is not the decoder

    with pytest.raises(QloraGaError, match=r"cannot find the decoder layers of NoStack"):
        find_decoder_layers(NoStack())
