"""--rank-allocation gradient: the allocation rule, exactness at init, vanilla-PEFT reload of per-module ranks."""

import math

import pytest
import torch

from qlora_ga import QloraGaError, estimate_factors, init_adapters, load_model
from qlora_ga.data import collate
from qlora_ga.export import save_adapter
from qlora_ga.estimate import Factors
from qlora_ga.init import factor_reducer, lora_layers, singular_vectors_needed
from qlora_ga.ranks import allocate_ranks, checkpoint_rank_pattern, rank_bounds, rank_pattern, trainable_count
from qlora_ga.residual import iter_residuals
from qlora_ga.testing import assert_close_rel, train_steps


def _factors(spectra: dict[str, tuple[tuple[int, int], list[float]]]) -> dict[str, Factors]:
    out = {}
    for name, ((m, n), s) in spectra.items():
        k = len(s)
        out[name] = Factors(torch.zeros(m, k), torch.tensor(s), torch.zeros(n, k), (m, n), float(torch.tensor(s).norm()))
    return out


def test_allocation_spends_the_uniform_budget_on_the_most_energy_per_parameter():
    # three 32x32 modules (cost 64 per rank) and one 32x96 (cost 128); uniform rank 4, bounds [2, 8]
    f = _factors({
        "a": ((32, 32), [8.0, 7, 6, 5, 4, 3, 2, 1.5]),  # big gradient: gets the most
        "b": ((32, 32), [1.0] * 8),
        "c": ((32, 32), [0.5] * 8),
        "d": ((32, 96), [6.0, 6, 6, 6, 0.1, 0.1, 0.1, 0.1]),  # large, but each rank costs twice as much
    })
    ranks = allocate_ranks(f, 4, method="lora-one")
    shapes = {n: x.shape for n, x in f.items()}
    budget = trainable_count(dict.fromkeys(f, 4), shapes)
    assert rank_bounds(4) == (2, 8)
    # worked by hand: per parameter, a's k-th rank is worth s_k^2/64 (3..8 -> 0.56..0.035), d's 36/128 = 0.28 (k=3,4),
    # b's 1/64, c's 0.25/64; the budget left after r_min everywhere is 2 * 320 = 640 = a: 6 ranks (384) + d: 2 (256)
    assert ranks == {"a": 8, "b": 2, "c": 2, "d": 4}
    assert trainable_count(ranks, shapes) == budget
    # LoRA-GA uses two singular vectors per rank: with 8 kept, no module can go past rank 4
    ga = allocate_ranks(f, 4, method="lora-ga")
    assert max(ga.values()) <= 4 and trainable_count(ga, shapes) <= budget
    assert rank_pattern(ranks, 4) == {"a": 8, "b": 2, "c": 2}


def test_allocation_never_exceeds_the_budget_and_leaves_less_than_one_more_rank():
    g = torch.Generator().manual_seed(0)
    shapes = [(64, 64), (64, 160), (160, 64), (64, 32)]
    f = _factors({f"m{i}": (shapes[i % 4], sorted(torch.rand(16, generator=g).mul(10).tolist(), reverse=True))
                  for i in range(12)})
    for rank in (2, 4, 8):
        ranks = allocate_ranks(f, rank, method="lora-one")
        lo, hi = rank_bounds(rank)
        assert all(lo <= r <= min(hi, 16) for r in ranks.values())
        sh = {n: x.shape for n, x in f.items()}
        left = trainable_count(dict.fromkeys(f, rank), sh) - trainable_count(ranks, sh)
        assert 0 <= left
        growable = [sum(sh[n]) for n, r in ranks.items() if r < min(hi, 16)]
        assert not growable or left < min(growable)


def test_allocation_errors():
    f = _factors({"a": ((32, 32), [1.0, 1.0])})
    with pytest.raises(QloraGaError, match="does not support init lora-ga-adam"):
        allocate_ranks(f, 2, method="lora-ga-adam")
    with pytest.raises(QloraGaError, match="only 2 singular values were kept"):
        allocate_ranks(f, 4, method="lora-ga")  # r_min 2 needs 4 vectors for LoRA-GA
    with pytest.raises(QloraGaError, match="r_min <= rank <= r_max"):
        allocate_ranks(f, 2, method="lora-one", r_min=3)


def test_gradient_ranks_are_exact_at_init_and_reload_in_vanilla_peft(tiny_model_dir, tmp_path):
    from peft import PeftModel

    model, tok = load_model(tiny_model_dir)
    g = torch.Generator().manual_seed(0)
    ex = []
    for i in range(12):
        ids = torch.randint(3, len(tok), (6 + i % 7,), generator=g).tolist()
        ex.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})
    batch = collate(ex, tok.pad_token_id)
    with torch.no_grad():
        before = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    r = 4
    keep = rank_bounds(r)[1]
    factors = estimate_factors(model, ex, rank=r, n_vectors=singular_vectors_needed("lora-ga", r),
                               reducer=factor_reducer("lora-ga", keep), micro_batch_size=4, progress=False)
    assert all(f.U.shape[1] == min(2 * keep, *f.shape) for f in factors.values())  # only the kept triplets
    ranks = allocate_ranks(factors, r, "lora-ga")
    assert len(set(ranks.values())) > 1  # the tiny model's spectra do differ between modules
    pm = init_adapters(model, factors, method="lora-ga", rank=r, alpha=16, rank_pattern=rank_pattern(ranks, r))
    layers = lora_layers(pm)
    assert {n: layer.r["default"] for n, layer in layers.items()} == ranks
    for n, layer in layers.items():
        assert layer.scaling["default"] == pytest.approx(16 / math.sqrt(ranks[n]))  # rsLoRA at the module's rank
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert trainable == trainable_count(ranks, {n: f.shape for n, f in factors.items()})
    assert trainable <= r * sum(sum(f.shape) for f in factors.values())
    assert len(list(iter_residuals(pm))) == 21
    with torch.no_grad():
        at_init = pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert_close_rel(at_init, before, 1e-5, "logits at init")  # exact through the residual at every rank
    train_steps(pm, batch)
    with torch.no_grad():
        trained = pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert float((trained - before).abs().max()) > 1e-3
    save_adapter(pm, tmp_path / "adapter")
    base, _ = load_model(tiny_model_dir)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    cfg = reloaded.peft_config["default"]
    assert cfg.rank_pattern  # per-module (2 r_i after folding the residual) ranks, in PEFT's own config
    assert {n: layer.r["default"] for n, layer in lora_layers(reloaded).items()} == {n: 2 * k for n, k in ranks.items()}
    with torch.no_grad():
        got = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert_close_rel(got, trained, 1e-4, "vanilla PEFT reload logits")  # measured 1.2e-6


def test_checkpoint_rank_pattern_is_checked_against_the_settings():
    sd = {"base_model.model.x.lora_A.weight": torch.zeros(2, 32), "base_model.model.x.lora_B.weight": torch.zeros(32, 2),
          "base_model.model.y.lora_A.weight": torch.zeros(6, 32), "base_model.model.y.lora_B.weight": torch.zeros(32, 6)}
    assert checkpoint_rank_pattern(sd, 4, "gradient") == {"x": 2, "y": 6}
    assert checkpoint_rank_pattern(sd, 4, "uniform") == {}
    for rank in (2, 8):  # rank 2: y above r_max 4; rank 8: x below r_min 4
        with pytest.raises(QloraGaError, match="not a gradient allocation"):
            checkpoint_rank_pattern(sd, rank, "gradient")
