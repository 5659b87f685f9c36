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


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
