"""triforce: lossless long-context speculative decoding (tiny draft -> retrieval draft -> target)."""
__all__ = ["Generator", "GenerationResult", "load"]


def __getattr__(name: str):
    # Imported on first use, not here (the API, triforce.generator; never the CLI module): `python -m
    # triforce.generate` imports this package first, and one that had imported triforce.generate makes runpy warn.
    if name in __all__:
        from triforce import generator

        return getattr(generator, name)
    raise AttributeError(f"module 'triforce' has no attribute {name!r}")
