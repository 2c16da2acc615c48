"""Training helpers and the export round trip with the real inits."""

import pytest
import torch

from qlora_ga import estimate_factors, init_adapters, load_model
from qlora_ga.data import collate
from qlora_ga.export import merge_export, save_adapter
from qlora_ga.init import lora_layers
from qlora_ga.testing import assert_close_rel, train_steps
from qlora_ga.train import TrainSettings, micro_batches_for_step, precondition_lora_grads, warmup_steps


def _examples(tok, n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        L = 6 + i % 7
        ids = torch.randint(3, len(tok), (L,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})
    return out


@pytest.mark.parametrize("method", ["lora-ga", "lora-one", "gaussian"])
def test_trained_adapter_reloads_in_vanilla_peft_and_merges_exactly(tiny_model_dir, tmp_path, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, tok = load_model(tiny_model_dir)
    ex = _examples(tok)
    factors = estimate_factors(model, ex, rank=4, micro_batch_size=4, progress=False) if method != "gaussian" else None
    pm = init_adapters(model, factors, method=method, rank=4, alpha=16)
    batch = collate(ex, tok.pad_token_id)
    train_steps(pm, batch)
    with torch.no_grad():
        trained = pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    save_adapter(pm, tmp_path / "adapter")
    base, _ = load_model(tiny_model_dir)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    with torch.no_grad():
        got = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert_close_rel(got, trained, 1e-4, "vanilla PEFT reload logits")  # measured 7e-7
    merge_export(tmp_path / "adapter", tmp_path / "merged", dtype="fp32", merge_base="dequantized")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        m = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert_close_rel(m, trained, 1e-4, "merged fp32 logits")


def test_lora_one_preconditioner_matches_its_formula(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    ex = _examples(tok)
    pm = init_adapters(model, estimate_factors(model, ex, rank=4, progress=False), method="lora-one", rank=4)
    pm(**collate(ex, tok.pad_token_id)).loss.backward()
    layer = next(iter(lora_layers(pm).values()))
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    gA, gB = A.grad.clone(), B.grad.clone()
    precondition_lora_grads(pm, lam=1e-6)
    eye = torch.eye(4)
    assert_close_rel(A.grad, torch.linalg.inv(B.T @ B + 1e-6 * eye) @ gA, 1e-4, "A.grad")
    assert_close_rel(B.grad, gB @ torch.linalg.inv(A @ A.T + 1e-6 * eye), 1e-4, "B.grad")  # measured 5e-8


def test_prodigy_without_its_package_is_a_one_line_error(monkeypatch):
    import sys

    from qlora_ga import QloraGaError
    from qlora_ga.train import build_optimizer

    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # import fails as if not installed
    model = torch.nn.Linear(2, 2)
    with pytest.raises(QloraGaError, match=r"--optim prodigy needs the prodigyopt package: pip install prodigyopt"):
        build_optimizer(model, TrainSettings(optim="prodigy", lr=1.0), torch.device("cpu"))


def test_warmup_is_a_fraction_of_the_steps_or_a_step_count():
    # what the scheduler gets: --warmup < 1 is a fraction of the run's steps (rounded), else a number of steps
    assert warmup_steps(100, 0.1) == 10 and warmup_steps(24, 0.03) == 1 and warmup_steps(10, 0.0) == 0
    assert warmup_steps(100, 5.0) == 5 and warmup_steps(3, 5.0) == 5


def test_data_order_is_a_pure_function_of_seed_and_step():
    data = [{"input_ids": [i], "labels": [i]} for i in range(10)]
    s = TrainSettings(batch_size=2, grad_accum=2, seed=3)
    steps = [micro_batches_for_step(data, k, s) for k in range(5)]  # 20 samples: two epochs of 10
    flat = [e["input_ids"][0] for st in steps for mb in st for e in mb]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]  # each epoch reshuffled
    assert micro_batches_for_step(data, 3, s) == steps[3]
    assert micro_batches_for_step(data, 0, TrainSettings(batch_size=2, grad_accum=2, seed=4)) != steps[0]


def test_nan_gradient_stops_before_the_update_and_keeps_the_last_good_checkpoint(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from qlora_ga.train import NonFiniteLoss, train

    model, tok = load_model(tiny_model_dir)
    pm = init_adapters(model, None, method="gaussian", rank=4)
    param = next(p for n, p in pm.named_parameters() if p.requires_grad)
    calls = []

    def poison(g):
        calls.append(1)
        return g * float("nan") if len(calls) >= 3 else g  # finite loss, NaN gradient from step 3 on

    param.register_hook(poison)
    s = TrainSettings(batch_size=4, grad_accum=1, lr=1e-3, max_steps=5, save_every=1, gradient_checkpointing=False)
    with pytest.raises(NonFiniteLoss, match=r"gradient became nan at step 3; the last good checkpoint is .*step-2"):
        train(pm, tok, _examples(tok), [], s, tmp_path, progress=False)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-1", "step-2"]
    assert all(torch.isfinite(t).all() for t in load_file(tmp_path / "checkpoints" / "step-2" / "adapter_model.safetensors").values())
    assert torch.isfinite(param).all()  # the poisoned step was not applied


def _lengths_data(n=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": [i] * L, "labels": [i] * L} for i, L in enumerate(torch.randint(1, 60, (n,), generator=g).tolist())]


def _padding(steps):
    return sum(len(mb) * max(len(e["input_ids"]) for e in mb) - sum(len(e["input_ids"]) for e in mb) for st in steps for mb in st)


def test_group_by_length_groups_each_chunk_and_keeps_every_epoch_a_permutation():
    from qlora_ga.train import LENGTH_GROUP_MICRO_BATCHES, StepBatches, epoch_order

    data = _lengths_data()
    s = TrainSettings(batch_size=2, grad_accum=3, seed=3, group_by_length=True)
    plain = TrainSettings(batch_size=2, grad_accum=3, seed=3)
    n_steps = 2 * len(data) // 6  # two epochs
    grouped = [micro_batches_for_step(data, k, s) for k in range(n_steps)]
    ungrouped = [micro_batches_for_step(data, k, plain) for k in range(n_steps)]
    flat = [e["input_ids"][0] for st in grouped for mb in st for e in mb]
    assert sorted(flat[: len(data)]) == list(range(len(data))) and sorted(flat[len(data) :]) == list(range(len(data)))
    assert flat[: len(data)] != flat[len(data) :]  # each epoch reshuffled
    # the same seeded permutation as without grouping, each chunk of 50 micro-batches sorted longest first
    group = LENGTH_GROUP_MICRO_BATCHES * s.batch_size
    lengths = [len(e["input_ids"]) for e in data]
    order, base = epoch_order(len(data), 3, 0, lengths, group), epoch_order(len(data), 3, 0)
    assert flat[: len(data)] == order
    for j in range(0, len(data), group):
        assert sorted(order[j : j + group]) == sorted(base[j : j + group])
        assert [lengths[i] for i in order[j : j + group]] == sorted((lengths[i] for i in base[j : j + group]), reverse=True)
    assert _padding(grouped) < _padding(ungrouped) / 4
    # a pure function of (seed, step): a fresh object (a resumed run) gives the same steps
    assert StepBatches(data, s).examples(n_steps - 1) == grouped[-1]


def test_step_loader_resumes_at_any_step_with_or_without_workers():
    from qlora_ga.train import StepBatches, step_loader

    data = _lengths_data(40)
    s = TrainSettings(batch_size=2, grad_accum=2, seed=1, group_by_length=True)
    cpu = torch.device("cpu")
    full = list(step_loader(data, s, 0, 0, 25, cpu))  # 100 sequences: two and a half epochs
    assert len(full) == 25
    s1 = TrainSettings(batch_size=2, grad_accum=2, seed=1, group_by_length=True, num_workers=1)
    for start, items in ((7, list(step_loader(data, s, 0, 7, 25, cpu))), (9, list(step_loader(data, s1, 0, 9, 25, cpu)))):
        assert len(items) == 25 - start
        for a, b in zip(full[start:], items):
            assert all(torch.equal(x[k], y[k]) for x, y in zip(a["micro_batches"], b["micro_batches"]) for k in x)
            assert a["label_tokens"] == b["label_tokens"] and a["input_tokens"] == b["input_tokens"]
    item = StepBatches(data, s, 0)[3]
    assert item["label_tokens"] == [int((b["labels"][:, 1:] != -100).sum()) for b in item["micro_batches"]]
    assert item["input_tokens"] == sum(len(e["input_ids"]) for mb in micro_batches_for_step(data, 3, s) for e in mb)


def test_logged_loss_is_the_token_weighted_loss_of_the_step(tiny_model_dir, tmp_path):
    from qlora_ga.metrics import read_metrics
    from qlora_ga.train import StepBatches, train

    model, tok = load_model(tiny_model_dir)
    pm = init_adapters(model, None, method="gaussian", rank=4)
    ex = _examples(tok)
    s = TrainSettings(batch_size=3, grad_accum=2, lr=1e-3, max_steps=1, optim="adamw", gradient_checkpointing=False)
    item = StepBatches(ex, s, tok.pad_token_id)[0]
    n = sum(item["label_tokens"])
    with torch.no_grad():
        want = sum(float(pm(**b).loss) * k / n for b, k in zip(item["micro_batches"], item["label_tokens"]))
    train(pm, tok, ex, [], s, tmp_path, progress=False)
    (row,) = read_metrics(tmp_path / "metrics.jsonl")
    assert_close_rel(row["loss"], want, 1e-6, "logged loss")  # measured 4e-8
    assert row["tokens_per_s"] > 0
