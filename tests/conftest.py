import pytest
import torch

from triforce.models.llama import embedded_gguf, resolve_checkpoint


@pytest.fixture(scope="session")
def smollm2_dir():
    """The embedded SmolLM2 checkpoint, converted once into the local cache."""
    return resolve_checkpoint(embedded_gguf())


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
