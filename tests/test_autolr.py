"""--lr auto (qlora_ga.train.autolr): the line search follows Adam's real first step, finds a minimum of the loss
along it, leaves the adapters as they were, and reaches the CLI (logged, written, resumed)."""

import json
import math

import pytest
import torch

from qlora_ga import estimate_factors, init_adapters, load_model
from qlora_ga.train.autolr import LR_FACTOR, find_lr
from qlora_ga.cli import main
from qlora_ga.data import collate
from qlora_ga.metrics import read_metrics
from qlora_ga.testing import assert_close_rel, random_examples

from test_cli import assert_clean_error, base_args


def _adapters(model_dir, method):
    model, tok = load_model(model_dir)
    ex = random_examples(len(tok), n=8)
    factors = estimate_factors(model, ex, rank=4, micro_batch_size=4, progress=False) if method != "gaussian" else None
    torch.manual_seed(0)
    return init_adapters(model, factors, method=method, rank=4, alpha=16), tok, ex


def _params(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def _loss(model, batch) -> float:
    return float(model(**batch).loss)


@pytest.mark.parametrize("method", ["gaussian", "lora-ga"])
def test_search_points_are_the_loss_after_one_real_adam_step(tiny_model_dir, method):
    pm, tok, ex = _adapters(tiny_model_dir, method)
    before = {n: p.detach().clone() for n, p in _params(pm).items()}
    s = find_lr(pm, ex, tok.pad_token_id, start=1e-3, steps=20, batch_size=4)
    # the adapters (and their absent gradients) are exactly as before
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in _params(pm).items())
    assert s.lr == pytest.approx(LR_FACTOR * s.eta, rel=1e-3) and s.factor == LR_FACTOR
    batch = collate(ex, tok.pad_token_id)
    pm.eval()
    assert_close_rel(s.loss_start, _loss(pm, batch), 1e-5, "loss at the start")  # measured 1.2e-7
    # every evaluated point is the loss after one torch AdamW step of that lr on the same sequences (token-weighted)
    for eta, loss in s.points[:3]:
        opt = torch.optim.AdamW(list(_params(pm).values()), lr=eta, weight_decay=0.0)
        pm(**batch).loss.backward()
        opt.step()
        assert_close_rel(_loss(pm, batch), loss, 2e-4, "loss after one AdamW step")  # measured 4e-7
        with torch.no_grad():
            for n, p in _params(pm).items():
                p.copy_(before[n])
                p.grad = None
    # eta* is a minimum along that step: its neighbours half a factor of 2 away are not lower (on a parabola's
    # vertex between evaluated points, the true loss may differ from the interpolation a little)
    direction = {}
    pm(**batch).loss.backward()
    for n, p in _params(pm).items():
        direction[n] = p.grad / (p.grad.abs() + 1e-8)
        p.grad = None

    def along(eta):
        with torch.no_grad():
            for n, p in _params(pm).items():
                p.copy_(before[n] - eta * direction[n])
        return _loss(pm, batch)

    at = along(s.eta)
    assert at < s.loss_start
    assert at <= along(s.eta * 2**0.5) + 1e-3 and at <= along(s.eta / 2**0.5) + 1e-3
    assert at == pytest.approx(s.loss_at_eta, abs=0.05 * (s.loss_start - at))


def test_the_lr_is_factor_times_eta_at_any_horizon_and_the_search_is_deterministic(tiny_model_dir):
    pm, tok, ex = _adapters(tiny_model_dir, "lora-ga")
    short = find_lr(pm, ex, tok.pad_token_id, start=1e-4, steps=50, batch_size=4)
    again = find_lr(pm, ex, tok.pad_token_id, start=1e-4, steps=50, batch_size=8)  # other micro-batches
    long = find_lr(pm, ex, tok.pad_token_id, start=1e-4, steps=300, batch_size=4)
    assert_close_rel(again.eta, short.eta, 1e-3, "eta, other micro-batches")  # measured 8e-6
    assert long.eta == short.eta and (long.steps, short.steps) == (300, 50)
    # no shrink for longer runs (measured at 100 steps: RESULTS.md section 8.1)
    assert long.lr == short.lr == pytest.approx(LR_FACTOR * short.eta, rel=1e-3)
    # the start only changes the walk, not where it ends (within the refinement's resolution)
    far = find_lr(pm, ex, tok.pad_token_id, start=64 * short.eta, steps=50, batch_size=4)
    assert abs(math.log2(far.eta / short.eta)) < 0.5


def test_cli_lr_auto_trains_with_the_found_lr_and_resumes_with_it(tiny_model_dir, tmp_path, capsys):
    """LoRA-GA's default lr is --lr auto's (the full run leaves --lr out; the interrupted one passes --lr auto)."""
    import os

    common = ("--max-steps", "4", "--warmup", "0", "--eval-split", "0.1")
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(base_args(tiny_model_dir, full, *common)) == 0  # --init lora-ga, no --lr: the default
    printed = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("lr auto: "))
    assert printed.endswith("s (--lr NUMBER sets it instead)")  # the lr, why, the search's time, how to override
    search = json.loads((full / "lr_search.json").read_text())
    assert f"{search['lr']:.3g}" in printed and f"{search['seconds']:.1f} s" in printed
    assert search["lr"] > 0 and search["lr"] == pytest.approx(LR_FACTOR * search["eta"], rel=1e-3)
    assert search["sequences"] == 8  # the first optimizer step's: batch 4 x grad-accum 2
    assert search["rule_version"] == 2 and search["seconds"] > 0 and len(search["points"]) >= 3
    rows = [r for r in read_metrics(full / "metrics.jsonl") if r["step"]]
    assert rows[0]["lr"] == search["lr"]  # no warmup: step 1 trains at the peak lr, the one found
    state = json.loads((full / "checkpoints" / "step-4" / "trainer_state.json").read_text())
    assert state["lr"] == search["lr"]
    assert "lr: auto" in (full / "run_config.yaml").read_text()  # the setting as given; the value is in lr_search.json
    os.environ["QLORA_GA_STOP_AFTER"] = "2"
    try:
        assert main(base_args(tiny_model_dir, part, *common, "--lr", "auto")) == 130
    finally:
        del os.environ["QLORA_GA_STOP_AFTER"]
    assert json.loads((part / "lr_search.json").read_text())["lr"] == search["lr"]  # the same search as the default's
    assert main(base_args(tiny_model_dir, part, *common, "--resume")) == 0  # the checkpoint's lr, no new search
    keys = ("step", "loss", "lr", "grad_norm", "eval_loss")
    assert [{k: r.get(k) for k in keys} for r in read_metrics(part / "metrics.jsonl")] == \
        [{k: r.get(k) for k in keys} for r in read_metrics(full / "metrics.jsonl")]


@pytest.mark.parametrize(
    "extra, pattern",
    [(("--lr", "auto", "--optim", "prodigy"), r"lr auto .*--optim"), (("--lr", "fast"), r"lr must be a number > 0 or 'auto'"),
     (("--lr", "nan"), r"lr must be"), (("--lr", "0"), r"lr must be")],
    ids=["with-prodigy", "word", "nan", "zero"],
)
def test_bad_lr_is_one_line(tiny_model_dir, tmp_path, capsys, extra, pattern):
    out = tmp_path / "run"
    code = main(base_args(tiny_model_dir, out, "--max-steps", "1", *extra))
    assert_clean_error(code, capsys.readouterr().err, pattern)
    assert not out.exists()


# ------------------------------------------------------------------ nothing non-finite passes silently


def _on_output(module, fn):
    """Forward hook on ``module`` whose output becomes ``fn(output)``."""
    return module.register_forward_hook(lambda m, args, out: fn(out))


def _grad_times(k):
    """``fn`` for :func:`_on_output`: the output's gradient is multiplied by ``k`` on its way back."""
    def fn(out):
        if out.requires_grad:
            out.register_hook(lambda g: g * k)
        return out
    return fn


def _assert_one_line(err, *parts):
    msg = str(err.value)
    assert "\n" not in msg and all(p in msg for p in parts), msg


@pytest.mark.parametrize("where", ["start", "every-step"])
def test_a_non_finite_loss_stops_the_search_with_one_line(tiny_model_dir, where):
    from qlora_ga.errors import QloraGaError

    pm, tok, ex = _adapters(tiny_model_dir, "gaussian")
    # "start": the loss is inf at the init; "every-step": finite at the init (its backward runs with grad),
    # inf after every step along Adam's first update (the probes run without grad)
    _on_output(pm.get_output_embeddings(),
               lambda out: out + math.inf if where == "start" or not torch.is_grad_enabled() else out)
    with pytest.raises(QloraGaError) as err:
        find_lr(pm, ex, tok.pad_token_id, start=1e-3, steps=20, batch_size=4)
    if where == "start":
        _assert_one_line(err, "--lr auto: the loss of the first step's sequences is not finite at the init (nan)", "pass --lr NUMBER")
    else:  # (it used to return 1.8 x the start without a word)
        _assert_one_line(err, "--lr auto: the loss is not finite after any step tried along Adam's first update (3 steps from 0.0005 to 0.002",
                         "pass --lr NUMBER")


def test_a_non_finite_gradient_stops_the_search_with_one_line(tiny_model_dir):
    from qlora_ga.errors import QloraGaError

    pm, tok, ex = _adapters(tiny_model_dir, "gaussian")
    _on_output(pm.base_model.model.model.norm, _grad_times(math.nan))
    with pytest.raises(QloraGaError) as err:
        find_lr(pm, ex, tok.pad_token_id, start=1e-3, steps=20, batch_size=4)
    _assert_one_line(err, "--lr auto: the adapters' gradient on the first step's sequences is not finite (NaN/inf) at the init",
                     "pass --lr NUMBER")


def _assert_overflow_is_scaled_away(model_dir, device):
    # the top block's gradient x 1e6 overflows fp16 (max 65504; measured |dL/dh| <= 0.3 per token of the
    # summed loss): the probe's backward backs off its loss scale, and the search ends where it ends without
    # the overflow (the adapters all sit below the hook: their gradient's signs, Adam's first step, are kept)
    model, tok = load_model(model_dir, compute_dtype="fp16", device=device)
    ex = random_examples(len(tok), n=2)  # short: fp16 matmuls are slow on the CPU
    torch.manual_seed(0)
    pm = init_adapters(model, None, method="gaussian", rank=4, alpha=16)
    k = [1.0]
    _on_output(model.model.norm, lambda out: _grad_times(k[0])(out))
    plain = find_lr(pm, ex, tok.pad_token_id, start=1e-3, steps=20, batch_size=2, compute_dtype=torch.float16)
    k[0] = 1e6
    big = find_lr(pm, ex, tok.pad_token_id, start=1e-3, steps=20, batch_size=2, compute_dtype=torch.float16)
    assert plain.loss_scale == 1 and big.loss_scale < 1 and big.as_dict()["loss_scale"] == big.loss_scale
    assert "fp16 overflow" in big.line() and "overflow" not in plain.line()
    assert big.loss_start == plain.loss_start
    assert big.eta == pytest.approx(plain.eta, rel=2e-2)  # measured 2.0e-3 on the CPU (fp16 rounding of the gradient)


def test_fp16_overflow_in_the_probe_backward_is_scaled_away_on_the_cpu(tiny_model_dir):
    _assert_overflow_is_scaled_away(tiny_model_dir, "cpu")


@pytest.mark.cuda
def test_fp16_overflow_in_the_probe_backward_is_scaled_away_on_cuda(tiny_model_dir):
    _assert_overflow_is_scaled_away(tiny_model_dir, "cuda")
