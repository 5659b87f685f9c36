"""triforce: lossless long-context speculative decoding (tiny draft -> retrieval draft -> target)."""
from triforce.generate import GenerationResult, Generator, load

__all__ = ["Generator", "GenerationResult", "load"]
