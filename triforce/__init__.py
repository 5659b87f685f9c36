"""triforce: lossless long-context speculative decoding (tiny draft -> retrieval draft -> target)."""
__all__ = ["Generator", "GenerationResult", "load"]


def __getattr__(name: str):
    # Imported on first use, not here: `python -m triforce.generate` imports this package first, and a
    # package that had already imported triforce.generate makes runpy warn at every start.
    if name in __all__:
        from triforce import generate

        return getattr(generate, name)
    raise AttributeError(f"module 'triforce' has no attribute {name!r}")
