import os

import pytest
import torch

if not torch.cuda.is_available():  # one mode for the whole session, set before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

from triforce.models.llama import embedded_gguf, resolve_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_dir():
    """The embedded SmolLM2 checkpoint, converted once into the local cache."""
    return resolve_checkpoint(embedded_gguf())


@pytest.fixture(scope="module")
def models():
    """A small peaky target (GQA, fp32) and its one-layer self-draft, on the GPU when there is one:
    what the graph-path and batch tests decode with."""
    from triforce.models.llama import ModelArgs, build_model

    args = ModelArgs(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128,
                     max_position_embeddings=1024)
    target = build_model(args, None, "cuda" if torch.cuda.is_available() else "cpu", torch.float32, seed=0).eval()
    with torch.no_grad():
        target.lm_head.weight.mul_(30)
    return target, target.layer_subset([0])


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
