"""Shared fixtures: a tiny random Llama with a small BPE tokenizer, saved with save_pretrained."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite runs on the CPU, also on a GPU machine (its bounds are fp32 CPU bounds). The tests marked
# `cuda` run on a GPU with `QLORA_GA_TEST_CUDA=1 python -m pytest -m cuda tests`, and skip otherwise.
TEST_CUDA = os.environ.get("QLORA_GA_TEST_CUDA") == "1"
if not TEST_CUDA:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if TEST_CUDA and torch.cuda.is_available():
        return
    why = "needs a CUDA GPU: run QLORA_GA_TEST_CUDA=1 python -m pytest -m cuda tests on a GPU machine"
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=why))

from qlora_ga.testing import make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Folder with a 3-layer Llama (hidden 64) and its tokenizer; fp32 weights in safetensors."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_sharded_model_dir(tmp_path_factory):
    """Same kind of model written in several safetensors shards (for the streaming export)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama-sharded"), max_shard_size="60KB", seed=1)


@pytest.fixture(scope="session")
def factors(tiny_model_dir):
    """The tiny Llama's SVD factors (8 triplets per target linear) from one gradient pass over 8 random sequences."""
    from qlora_ga.estimate import gradient_pass, svd_reducer
    from qlora_ga.model import load_model
    from qlora_ga.testing import random_examples

    model, tok = load_model(tiny_model_dir)
    G = gradient_pass(model, random_examples(n=8, seed=2), lambda n, g: g.clone(), micro_batch_size=4,
                      pad_token_id=tok.pad_token_id, progress=False)
    return {n: svd_reducer(8)(n, g) for n, g in G.items()}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
