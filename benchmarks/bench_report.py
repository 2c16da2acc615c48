#!/usr/bin/env python
"""Pool the rows of several ``bench_convergence.py`` runs into one markdown table, mean and spread over seeds.

    python benchmarks/bench_report.py docs/benchmarks/convergence-cpu*.jsonl
    python benchmarks/bench_report.py --out docs/benchmarks/summary.md docs/benchmarks/*.jsonl
    python benchmarks/bench_report.py --plot curves.png --plot-best-only docs/benchmarks/*.jsonl
    python benchmarks/bench_report.py --auto-vs-grid docs/benchmarks/convergence-cpu-oos.jsonl

Runs are grouped by their setting (method, base, optimizer, gradient-sample size, ``--gamma`` override,
steps, tokens per step, held-out size) and lr; a group's seeds are pooled, whichever file or process they came from. Only
finished runs count (a ``kind: "run"`` row); the step rows of the same ``run_id`` give the curves.

Columns: held-out loss at step 0, at half the steps and at the end (mean +- population std over seeds,
and the seeds), and, per seed, the first step at which the training loss smoothed over ``--smooth``
steps reaches the final smoothed training loss of the baseline (vanilla LoRA, ``gaussian``, at its
best lr within the same steps / tokens-per-step / held-out setting) on the same seed: every seed has
its own data order, so curves are only compared within a seed.
``--auto-vs-grid``: instead, the ``--lr auto`` runs against the method's fixed default lr and the grid
of fixed lrs of the same setting, with paired gaps (:func:`auto_table`).
No torch import: it reads JSON (and the package's table of default lrs) only.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

BASELINE = "gaussian"
AUTO = "auto"  # the lr of a --lr auto run (its row's lr_found holds the value it chose)
SETTING = ("total_steps", "batch_size", "grad_accum", "max_length", "eval_examples", "rank")


def read_rows(paths: list[str]) -> list[dict]:
    rows = []
    for p in paths:
        for i, line in enumerate(Path(p).read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise SystemExit(f"error: {p}:{i} is not a JSON line") from None
    return [r for r in rows if r.get("bench") == "convergence"]


def moving_average(xs: list[float], w: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= w:
            acc -= xs[i - w]
        out.append(acc / min(i + 1, w))
    return out


def _fmt(vals: list[float]) -> str:
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{statistics.fmean(vals):.3f} ± {statistics.pstdev(vals):.3f}"


def _lr_key(lr) -> tuple:
    """Sort key of an lr: numbers by value, then "auto"."""
    return (True, 0.0) if lr == AUTO else (False, lr)


def _lr_text(lr, runs: list[dict] | None = None) -> str:
    """``2e-3``, or ``auto`` with the values the runs chose (per seed)."""
    if lr != AUTO:
        return f"{lr:g}"
    found = [f"{r['lr_found']:.2g}" for r in runs or [] if isinstance(r.get("lr_found"), (int, float))]
    return f"auto ({' / '.join(found)})" if found else "auto"


def collect(rows: list[dict]) -> dict:
    """{(setting, variant, lr): [run, ...]}; a run = {"seed", "eval": {step: loss}, "loss": [..]}."""
    steps = defaultdict(list)
    for r in rows:
        if r.get("kind") == "step":
            steps[(r["run_id"], r["method"], r["lr"], r["seed"])].append(r)
    groups = defaultdict(list)
    for r in rows:
        if r.get("kind") != "run" or r.get("error"):
            continue
        srows = sorted(steps[(r["run_id"], r["method"], r["lr"], r["seed"])], key=lambda x: x["step"])
        evals = {s["step"]: s["eval_loss"] for s in srows if isinstance(s.get("eval_loss"), (int, float))}
        losses = [s["loss"] for s in srows if s["step"] > 0 and isinstance(s.get("loss"), (int, float))]
        setting = tuple(r.get(k) for k in SETTING)
        gradient = r.get("init") != BASELINE
        method = f"{r['method']} lr auto" if r["lr"] == AUTO else r["method"]  # its own variant, never the baseline
        variant = (method, r.get("optim", "?"), r.get("init_samples") if gradient else None,
                   r.get("gamma_override") if gradient else None, r.get("rank_allocation") or "uniform")
        groups[(setting, variant, r["lr"])].append({"seed": r["seed"], "eval": evals, "loss": losses,
                                                    "lr_found": r.get("lr_found")})
    return groups


def analyse(groups: dict, smooth: int) -> list[dict]:
    """Per setting (sorted): ``keys`` in table order, ``best_of`` {variant: best key}, ``baseline`` (the
    baseline's best key or None), ``target`` {seed: baseline's final smoothed training loss} and ``reach``
    {key: {seed: first step at or below the same seed's target, or None}}."""
    out = []
    for setting in sorted({k[0] for k in groups}, key=str):
        steps = setting[0]
        # baseline first, then by method, optimizer, sample size, gamma and lr (numbers as numbers)
        keys = sorted((k for k in groups if k[0] == setting),
                      key=lambda k: (k[1][0] != BASELINE, k[1][0], k[1][1], k[1][2] or 0, k[1][3] or 0, k[1][4], _lr_key(k[2])))

        def final(k, seeds=None):
            vals = [r["eval"][steps] for r in groups[k] if steps in r["eval"] and (seeds is None or r["seed"] in seeds)]
            return statistics.fmean(vals) if vals else math.inf

        # best lr of a variant: lowest mean final held-out loss over the seeds all of its lrs have
        best_of = {}
        for variant in sorted({k[1] for k in keys}, key=str):
            ks = [k for k in keys if k[1] == variant]
            common = set.intersection(*({r["seed"] for r in groups[k]} for k in ks))
            best_of[variant] = min(ks, key=lambda k: (final(k, common or None), _lr_key(k[2])))
        # the baseline's final smoothed training loss, per seed (each seed has its own data order)
        # (vanilla LoRA with the default optimizer and uniform ranks when there is one)
        base = min((b for b in best_of.values() if b[1][0] == BASELINE), default=None,
                   key=lambda b: (b[1][4] != "uniform", "adamw" not in b[1][1], str(b)))
        target = {r["seed"]: moving_average(r["loss"], smooth)[-1] for r in groups[base] if r["loss"]} if base else {}
        reach = {}
        for k in keys:
            reach[k] = {}
            for r in groups[k]:
                if r["seed"] in target and r["loss"]:
                    curve = moving_average(r["loss"], smooth)
                    reach[k][r["seed"]] = next((i + 1 for i, v in enumerate(curve) if v <= target[r["seed"]]), None)
        out.append({"setting": setting, "keys": keys, "best_of": best_of, "baseline": base, "target": target,
                    "reach": reach})
    return out


def table(groups: dict, smooth: int) -> list[str]:
    out = []
    for a in analyse(groups, smooth):
        setting, base, target = a["setting"], a["baseline"], a["target"]
        steps = setting[0]
        half = steps // 2 if steps else None
        tps = (setting[1] or 0) * (setting[2] or 1)
        out.append(f"### {steps} steps of {tps}x{setting[3]} tokens, {setting[4]} held-out examples, rank {setting[5]}")
        out.append("")
        out.append(f"Baseline: {BASELINE} at its best lr ({'none' if not base else f'{base[2]:g}'}); its final training loss "
                   f"(moving average of {smooth}) per seed: "
                   f"{', '.join(f'seed {s} {v:.3f}' for s, v in sorted(target.items())) or 'n/a'}. "
                   "**Bold**: the best lr of a method (lowest mean over the seeds all its lrs share). "
                   "Last column: first step, per seed, at which a run's smoothed training loss reaches the baseline's "
                   "final one on the same seed (- : not reached).")
        out.append("")
        out.append(f"| method | optim | sample | lr | seeds | held-out @0 | @{half} | @{steps} | steps to baseline's final train loss |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for k in a["keys"]:
            method, optim, sample, gamma, ranks = k[1]
            if gamma is not None:
                method = f"{method} (gamma {gamma:g})"
            if ranks != "uniform":
                method = f"{method}, {ranks} ranks"
            runs = sorted(groups[k], key=lambda r: r["seed"])
            at = lambda s: [r["eval"][s] for r in runs if s in r["eval"]]  # noqa: E731
            reach = ["-" if v is None else str(v) for _, v in sorted(a["reach"][k].items())]
            lr = _lr_text(k[2], runs)
            lr = f"**{lr}**" if a["best_of"][k[1]] == k and k[2] != AUTO else lr
            out.append(f"| {method} | {optim} | {'-' if sample is None else sample} | {lr} | "
                       f"{','.join(str(r['seed']) for r in runs)} | {_fmt(at(0))} | {_fmt(at(half))} | {_fmt(at(steps))} | "
                       f"{' / '.join(reach) if reach else 'n/a'} |")
        out.append("")
    return out


def _package():
    """The ``qlora_ga`` package of this checkout, importable (the benchmarks run as scripts, not installed)."""
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)


def _default_lrs() -> dict:
    """{init: its fixed default lr} from the package's table (``qlora_ga/methods.py``; imports no torch)."""
    _package()
    from qlora_ga.methods import METHOD_DEFAULTS

    return {m: d["lr"] for m, d in METHOD_DEFAULTS.items()}


SETTING_TEXT = ("{} steps", "micro-batch {}", "grad-accum {}", "max-length {}", "{} held-out", "rank {}")


def auto_table(groups: dict) -> list[str]:
    """``--lr auto`` against the fixed default lr and a grid of fixed lrs, one row per setting and variant that
    has auto runs (RESULTS 8.4). Held-out loss at the last step, per seed in the row's seed order (- : that lr
    has no run on that seed). Gaps are paired: the mean over the seeds both runs have of auto's loss minus the
    other's. The best grid point is the one auto trails most, among the lrs that ran every seed auto ran (all
    lrs when none did); it is "bracketed" when a lower and a higher lr each ended worse than it on the seeds
    they share with it. A setting is named by what differs from the most common value of each field (and an
    init by its gradient-sample size where that is not the most common one)."""
    defaults = _default_lrs()
    rows = defaultdict(dict)  # (setting, variant without "lr auto") -> {lr: {seed: final held-out}}
    found = defaultdict(dict)  # (setting, variant) -> {seed: the lr auto chose}
    for (setting, variant, lr), runs in groups.items():
        base = (variant[0].removesuffix(" lr auto"),) + variant[1:]
        for r in runs:
            if setting[0] in r["eval"]:
                rows[(setting, base)].setdefault(lr, {})[r["seed"]] = r["eval"][setting[0]]
                if lr == AUTO:
                    found[(setting, base)][r["seed"]] = r.get("lr_found")
    rows = {k: v for k, v in rows.items() if AUTO in v}
    if not rows:
        return []
    n_runs = {k: sum(map(len, cells.values())) for k, cells in rows.items()}

    def mode(pairs, tie):  # the value with the most runs, of (value, runs) pairs; ties by tie(value)
        runs = defaultdict(int)
        for v, n in pairs:
            runs[v] += n
        return max(runs, key=lambda v: (runs[v], tie(v))) if runs else None

    common = tuple(mode(((s[i], n) for (s, _), n in n_runs.items()), str) for i in range(len(SETTING)))
    common_sample = mode(((v[2], n) for (_, v), n in n_runs.items() if v[2] is not None), lambda n: n)

    def name(setting):
        return ", ".join(t.format(v) for t, v, c in zip(SETTING_TEXT, setting, common) if v != c) or "common setting"

    def gap(a: dict, b: dict):
        shared = sorted(set(a) & set(b))
        return (statistics.fmean(a[s] - b[s] for s in shared), shared) if shared else (None, shared)

    out = [f"Common setting: {', '.join(t.format(v) for t, v in zip(SETTING_TEXT, common))}.", "",
           "| setting | init | seeds | `--lr auto`: lr found -> held-out | fixed default -> held-out | grid (held-out) "
           "| auto - default | auto - best grid |", "|---|---|---|---|---|---|---|---|"]
    for (setting, variant), cells in sorted(rows.items(), key=lambda kv: (name(kv[0][0]), str(kv[0][1]))):
        method, optim, sample, gamma, ranks = variant
        auto = cells.pop(AUTO)
        seeds = sorted(set().union(*cells.values(), auto))
        def per_seed(d, f="{:.4f}"):
            return " / ".join(f.format(d[s]) if s in d else "-" for s in seeds)

        def on(shared):  # which seeds a gap is over, where that is not every seed of the row
            return "" if shared == seeds else f"seed{'s' if len(shared) > 1 else ''} {','.join(map(str, shared))}"

        vs_auto = {lr: gap(auto, cells[lr]) for lr in cells}  # lr -> (auto - it over shared seeds, shared seeds)

        label = "".join([method, f" (gamma {gamma:g})" if gamma is not None else "",
                         f", gradient sample {sample}" if sample not in (None, common_sample) else "",
                         f", {optim}" if "adamw" not in optim else "", f", {ranks} ranks" if ranks != "uniform" else ""])
        chose = per_seed({s: v for s, v in found[(setting, variant)].items() if isinstance(v, (int, float))}, "{:.3g}")
        default = defaults.get(method)
        grid = ", ".join(f"{lr:g}: {per_seed(cells[lr])}" for lr in sorted(cells)) or "none"
        if default in cells:
            d_gap, shared = vs_auto[default]
            d_text = f"{default:g} -> {per_seed(cells[default])}"
            d_gap = "-" if d_gap is None else f"{d_gap:+.4f}" + (f" ({on(shared)})" if on(shared) else "")
        else:
            d_text, d_gap = f"{default:g} -> not run" if default is not None else "none", "-"
        paired = [lr for lr in cells if vs_auto[lr][0] is not None]
        full = [lr for lr in paired if set(auto) <= set(cells[lr])] or paired
        if full:
            best = max(full, key=lambda lr: (vs_auto[lr][0], -lr))
            b_gap, shared = vs_auto[best]
            worse = [lr for lr in cells if lr != best and (gap(cells[lr], cells[best])[0] or 0) > 0]
            bracket = ("bracketed" if any(lr < best for lr in worse) and any(lr > best for lr in worse)
                       else "not bracketed: no worse lr on one side")
            b_text = f"{b_gap:+.4f} (best {best:g}, {bracket}{'; ' + on(shared) if on(shared) else ''})"
        else:
            b_text = "-"
        out.append(f"| {name(setting)} | {label} | {','.join(map(str, seeds))} | {chose} -> {per_seed(auto)} | {d_text} "
                   f"| {grid} | {d_gap} | {b_text} |")
    out.append("")
    return out


def _label(key, n_seeds: int) -> str:
    method, optim, sample, gamma, ranks = key[1]
    extra = "".join([f" gamma {gamma:g}" if gamma is not None else "", f" {optim}" if "adamw" not in optim else "",
                     f" {ranks} ranks" if ranks != "uniform" else "",
                     f" [{sample}]" if sample is not None else ""])
    return f"{method}{extra} lr {_lr_text(key[2])} ({n_seeds} seed{'s' if n_seeds > 1 else ''})"


def figure(groups: dict, smooth: int, title: str = "", best_only: bool = False):
    """One row of two panels per setting: training loss (moving average of ``smooth``, mean over seeds) and
    held-out loss (mean over seeds, at the steps every seed has) of every group; a variant's best lr solid,
    its other lrs dashed (``best_only``: the best lrs alone). Returns the matplotlib Figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    found = analyse(groups, smooth)
    fig = Figure(figsize=(13, 5 * len(found)), dpi=100)
    FigureCanvasAgg(fig)
    colors = [f"C{i}" for i in range(10)]
    for row, a in enumerate(found):
        ax_t, ax_e = fig.add_subplot(len(found), 2, 2 * row + 1), fig.add_subplot(len(found), 2, 2 * row + 2)
        variants = list(a["best_of"])
        for k in a["keys"]:
            is_best = a["best_of"][k[1]] == k
            if best_only and not is_best:
                continue
            runs = groups[k]
            style = dict(color=colors[variants.index(k[1]) % len(colors)], linestyle="-" if is_best else "--",
                         linewidth=1.6 if is_best else 0.9, label=_label(k, len(runs)))
            curves = [r["loss"] for r in runs if r["loss"] and all(map(math.isfinite, r["loss"]))]
            if curves:
                n = min(len(c) for c in curves)
                ys = moving_average([statistics.fmean(c[i] for c in curves) for i in range(n)], smooth)
                ax_t.plot(range(1, n + 1), ys, **style)
            steps = sorted(set.intersection(*(set(r["eval"]) for r in runs)))
            if steps:
                ax_e.plot(steps, [statistics.fmean(r["eval"][s] for r in runs) for s in steps], marker="o", markersize=3,
                          **style)
        if a["target"]:
            ax_t.axhline(statistics.fmean(a["target"].values()), color="gray", linewidth=0.8, linestyle=":",
                         label=f"{BASELINE} best-lr final (mean over seeds)")
        setting = a["setting"]
        ax_t.set_title(f"training loss (moving average of {smooth}, mean over seeds)", fontsize=10)
        ax_e.set_title(f"held-out loss ({setting[4]} examples, mean over seeds)", fontsize=10)
        for ax in (ax_t, ax_e):
            ax.set_xlabel(f"optimizer step ({(setting[1] or 0) * (setting[2] or 1)}x{setting[3]} tokens)")
            ax.set_ylabel("mean token cross-entropy")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _atomic_write(path: str, write) -> None:
    """The package's atomic_write (a half-written report never replaces a good one)."""
    _package()
    from qlora_ga.fileio import atomic_write

    atomic_write(path, write)


def plot(groups: dict, smooth: int, path: str, title: str = "", best_only: bool = False) -> str:
    """:func:`figure` written atomically to the PNG ``path``; returns ``path``."""
    fig = figure(groups, smooth, title, best_only)
    _atomic_write(path, lambda f: fig.savefig(f, format="png"))
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", help="JSONL files written by bench_convergence.py")
    p.add_argument("--smooth", type=int, default=10, help="moving-average window of the training loss")
    p.add_argument("--out", default=None, help="also write the table to this markdown file")
    p.add_argument("--plot", default=None, help="also draw the curves of every group in this PNG")
    p.add_argument("--plot-best-only", action="store_true", help="with --plot: only each variant's best lr")
    p.add_argument("--auto-vs-grid", action="store_true",
                   help="instead of the table: --lr auto against the fixed default and the grid, per setting (RESULTS 8.4)")
    args = p.parse_args(argv)
    missing = [f for f in args.files if not Path(f).is_file()]
    if missing:
        print(f"error: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    groups = collect(read_rows(args.files))
    if not groups:
        print("error: no finished convergence runs in these files", file=sys.stderr)
        return 2
    lines = auto_table(groups) if args.auto_vs_grid else table(groups, args.smooth)
    if not lines:
        print("error: no finished --lr auto runs in these files", file=sys.stderr)
        return 2
    text = "\n".join(lines)
    print(text)
    if args.out:
        _atomic_write(args.out, lambda f: f.write((text + "\n").encode()))
    if args.plot:
        print(f"plot: {plot(groups, args.smooth, args.plot, best_only=args.plot_best_only)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
