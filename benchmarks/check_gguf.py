#!/usr/bin/env python
"""Compare GGUF exports with the merged model they came from: logits (transformers, ``gguf_file=``), file sizes,
and, when ``llama-cpp-python`` is installed, greedy generation in llama.cpp itself.

    python benchmarks/check_gguf.py --merged runs/x/merged runs/x/gguf/model-f16.gguf runs/x/q8/model-q8_0.gguf \
        [--data gsm8k/test.jsonl] [--prompts 8] [--gen-tokens 32] [--json out.json]

Logits: every prompt (question + answer of the data, or of the built-in arithmetic problems) through the merged
model and through each GGUF loaded back by transformers, both in fp32; reported: max |delta|, max |delta| relative
to the largest merged logit, mean |delta|, and how often the top-1 token agrees. Generation: the chat-formatted
question, ``--gen-tokens`` greedy tokens from the merged model (transformers) and from the GGUF (llama.cpp); the
count of prompts whose tokens are identical.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _examples(path: str | None, n: int) -> list[tuple[str, str]]:
    if path:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    else:
        from qlora_ga.data import make_arithmetic_examples

        rows = make_arithmetic_examples(n, seed=1)
    return [(r["question"], r["answer"]) for r in rows[:n]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("gguf", nargs="+", help="GGUF files to check")
    p.add_argument("--merged", required=True, help="the merged model folder the GGUFs were made from")
    p.add_argument("--data", default=None, help="JSONL with question/answer (default: built-in arithmetic problems)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_ga.log import quiet_libraries

    quiet_libraries()
    tok = AutoTokenizer.from_pretrained(args.merged)
    examples = _examples(args.data, args.prompts)
    texts = [q + "\n" + a for q, a in examples]
    chats = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q, _ in examples]
    ids = [tok(t).input_ids for t in texts]
    chat_ids = [tok(t).input_ids for t in chats]

    @torch.no_grad()
    def logits_of(model):
        return [model(torch.tensor([x])).logits[0] for x in ids]

    merged = AutoModelForCausalLM.from_pretrained(args.merged, dtype=torch.float32).eval()
    ref = logits_of(merged)
    with torch.no_grad():
        ref_gen = [merged.generate(torch.tensor([x]), attention_mask=torch.ones(1, len(x), dtype=torch.long),
                                   max_new_tokens=args.gen_tokens, do_sample=False)[0, len(x):].tolist() for x in chat_ids]
    del merged
    try:
        import llama_cpp
    except ImportError:
        llama_cpp = None

    results = []
    for f in map(Path, args.gguf):
        g_tok = AutoTokenizer.from_pretrained(str(f.parent), gguf_file=f.name)
        same_ids = all(g_tok(t).input_ids == x for t, x in zip(texts, ids))
        model = AutoModelForCausalLM.from_pretrained(str(f.parent), gguf_file=f.name, dtype=torch.float32).eval()
        got = logits_of(model)
        del model
        d = torch.cat([(a - b).abs().flatten() for a, b in zip(got, ref)])
        top = torch.cat([(a.argmax(-1) == b.argmax(-1)).float() for a, b in zip(got, ref)])
        scale = max(r.abs().max().item() for r in ref)
        row = {"file": str(f), "bytes": f.stat().st_size, "same_token_ids": same_ids, "max_abs": d.max().item(),
               "max_rel": d.max().item() / scale, "mean_abs": d.mean().item(), "top1_agree": top.mean().item(),
               "positions": int(d.numel() // ref[0].shape[-1])}
        if llama_cpp is not None:
            llm = llama_cpp.Llama(str(f), n_ctx=512, n_threads=2, verbose=False)
            same = 0
            for x, want in zip(chat_ids, ref_gen):
                out = []
                for t in llm.generate(x, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
                    out.append(t)
                    if len(out) == len(want) or t == tok.eos_token_id:
                        break
                same += out == want
            row["greedy_same"] = f"{same}/{len(chat_ids)}"
            del llm
        results.append(row)
        print(f"{f.name}: {row['bytes'] / 1e6:.1f} MB, same token ids {same_ids}, max|d| {row['max_abs']:.4g} "
              f"(rel {row['max_rel']:.3g}), mean|d| {row['mean_abs']:.3g}, top-1 agree {row['top1_agree']:.4f} over "
              f"{row['positions']} positions" + (f", greedy {args.gen_tokens} tokens identical {row['greedy_same']}"
                                                  if "greedy_same" in row else ", greedy: llama-cpp-python not installed"),
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"merged": args.merged, "prompts": len(ids), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
