"""The gradient pass, saved by every process: run by tests/test_distributed.py under torchrun, and its ``main``
called in the test's own process for the one-process run."""

import sys

import torch

from qlora_ga import distributed, gradient_pass, load_model
from qlora_ga.estimate import svd_reducer
from qlora_ga.init import lora_ga_factors


def main(model_dir: str, out: str, micro_batch_size: str = "2"):
    distributed.init()
    model, tok = load_model(model_dir, device="cpu")
    g = torch.Generator().manual_seed(0)
    examples = []
    for i in range(10):
        ids = torch.randint(3, len(tok), (5 + 2 * i,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})

    def reduce(name, G):  # keep G itself and the LoRA-GA start from its (exact) SVD
        A0, B0 = lora_ga_factors(svd_reducer(8, "exact")(name, G), 4, 16.0)
        return G.clone(), B0 @ A0

    res = gradient_pass(model, examples, reduce, micro_batch_size=int(micro_batch_size), pad_token_id=tok.pad_token_id,
                        progress=False)
    torch.save({"G": {n: v[0] for n, v in res.items()}, "BA": {n: v[1] for n, v in res.items()},
                "world": distributed.world()}, f"{out}.rank{distributed.rank()}")
    distributed.finish()


if __name__ == "__main__":
    main(*sys.argv[1:])
