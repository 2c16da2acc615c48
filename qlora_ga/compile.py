"""``--compile``: ``torch.compile`` per decoder block for training.

Each decoder block's forward is compiled in place (``nn.Module.compile``); blocks of the same class and
shapes share one graph (their weights are graph inputs), so the compile cost is one block's, paid on the
first step (and once more when the sequence length first changes: the second graph has dynamic shapes).
Everything inside a block is covered: the 4-bit linears (bitsandbytes' ops are registered custom ops),
PEFT's LoRA layers with qlora-ga's frozen residual, and the gradient-checkpointed recompute (the
checkpoint wraps the compiled block; see :func:`dynamo_settings`). The per-sequence attention of padding-free rows
(:mod:`qlora_ga.attention`) cuts the row by ``position_ids`` on the host, which dynamo cannot trace, and a graph
break inside a gradient-checkpointed block makes dynamo run the whole block eager: so on that attention
each block's parts are compiled instead (its MLP, norms and attention projections), the attention core eager
between them. What cannot compile falls back to eager (``torch._dynamo``'s ``suppress_errors``), never a
crash; after the first step the run reports the graph breaks, the graphs and the compile time, or a warning
line when nothing compiled.

``QLORA_GA_COMPILE_BACKEND`` picks the backend (default ``inductor``; the test suite uses ``aot_eager``,
which traces the same graphs without generating code).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass, field

from .arch import find_decoder_layers, unwrap


@dataclass
class CompileReport:
    blocks: int = 0  # decoder blocks compiled
    backend: str = ""
    graph_breaks: int = 0  # over all compiled calls of the run so far
    graphs: int = 0  # distinct graphs compiled (one per block shape, plus recompiles)
    compile_s: float = 0.0  # time spent compiling
    break_reasons: list = field(default_factory=list)  # the distinct reasons, most frequent first (at most 5)
    parts: str = "block"  # what of each block is compiled

    def as_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        why = f" ({self.break_reasons[0]})" if self.break_reasons else ""
        if not self.graphs:  # the backend failed (dynamo's suppress_errors says nothing) or every call broke the graph
            return (f"warning: --compile compiled nothing with {self.backend}{why}: the blocks ran eager "
                    f"(run without --compile, or set QLORA_GA_COMPILE_BACKEND to another backend)")
        per_block = f", {self.graph_breaks / self.blocks:.2g} per block" if self.blocks and self.graph_breaks else ""
        what = f"{self.blocks} decoder blocks" if self.parts == "block" else f"{self.parts} of {self.blocks} decoder blocks"
        return (f"compile: {what} with {self.backend}, {self.graphs} graph(s) compiled in "
                f"{self.compile_s:.1f} s, {self.graph_breaks} graph break(s){per_block}{why}")


def backend() -> str:
    return os.environ.get("QLORA_GA_COMPILE_BACKEND", "inductor")


def _layers(model):
    return find_decoder_layers(unwrap(model))[1]


#: a child of a decoder block holding one of these is its attention module
ATTENTION_PROJECTIONS = ("q_proj", "qkv_proj", "o_proj", "query_key_value", "c_attn", "Wqkv")


def _targets(layer, per_sequence: bool) -> list:
    """What of a decoder block to compile: the block, or with per-sequence attention (a host-side cut of the row that
    dynamo cannot trace, and a graph break inside a gradient-checkpointed block stops dynamo for the whole block)
    every child but the attention module, and that module's own children (its projections): all the block's
    matmuls, norms and MLP, with the attention core eager between them."""
    if not per_sequence:
        return [layer]
    out = []
    for child in layer.children():
        if not any(True for _ in child.parameters()):
            continue
        if any(hasattr(child, proj) for proj in ATTENTION_PROJECTIONS):  # the attention module: its projections
            out += [m for m in child.children() if any(True for _ in m.parameters())]
        else:
            out.append(child)
    return out


def compile_blocks(model) -> CompileReport:
    """Compile every decoder block of ``model`` (a PEFT wrapper or a transformers model) in place (see
    :func:`_targets` for a model on per-sequence attention); resets dynamo's counters so :func:`compile_stats`
    reports this run's compiles."""
    import torch._dynamo

    from .attention import PACKED_SDPA

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    layers = _layers(model)
    per_sequence = unwrap(model).config._attn_implementation == PACKED_SDPA
    name = backend()
    for layer in layers:
        for target in _targets(layer, per_sequence):
            target.compile(backend=name)
    return CompileReport(blocks=len(layers), backend=name, parts="block" if not per_sequence else
                         "each block's MLP, norms and attention projections (the per-sequence attention eager)")


def compile_stats(report: CompileReport) -> CompileReport:
    """Fill ``report`` from dynamo's counters: graph breaks (with their reasons), graphs and compile time."""
    from torch._dynamo.utils import compilation_time_metrics, counters

    breaks = counters.get("graph_break", {})
    report.graph_breaks = int(sum(breaks.values()))
    report.break_reasons = [str(k).splitlines()[0][:160] for k, _ in sorted(breaks.items(), key=lambda kv: -kv[1])[:5]]
    report.graphs = int(counters.get("stats", {}).get("unique_graphs", 0))
    report.compile_s = round(sum(sum(v) for k, v in compilation_time_metrics.items() if "compile_inner" in k), 2)
    return report


def compiled_switch(model):
    """After :func:`compile_blocks`: a function turning the compiled forwards on (True) or off (False), so that one
    model can be timed both ways (``benchmarks/bench_step.py --compile``)."""
    mods = [(m, m._compiled_call_impl) for m in unwrap(model).modules() if m._compiled_call_impl is not None]

    def switch(on: bool):
        for m, fn in mods:
            m._compiled_call_impl = fn if on else None

    return switch


def uncompile_blocks(model):
    """Back to the eager forward (evaluation, generation and export after training run eager)."""
    for layer in _layers(model):
        for m in layer.modules():
            m._compiled_call_impl = None


@contextlib.contextmanager
def compiled(model, enabled: bool):
    """Inside: ``model``'s blocks compiled (when ``enabled``), errors falling back to eager; yields the report (None
    when not enabled). The blocks are eager again on leaving."""
    if not enabled:
        yield None
        return
    report = compile_blocks(model)
    try:
        with dynamo_settings():
            yield report
    finally:
        uncompile_blocks(model)


def dynamo_settings():
    """The dynamo settings of a compiled run: errors fall back to eager (``suppress_errors``), and a forward's
    side effects on Python state (transformers' context variables) are not replayed by the checkpointed
    recompute (``skip_fwd_side_effects_in_bwd_under_checkpoint``: without it every block under gradient
    checkpointing is a graph break and runs eager)."""
    import torch._dynamo

    return torch._dynamo.config.patch(suppress_errors=True, skip_fwd_side_effects_in_bwd_under_checkpoint=True)
