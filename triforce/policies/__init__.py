"""KV-selection policies from the literature as middle-tier draft caches (GitHub issue 6).

Every policy subclasses `triforce.cache.SelectionCache`: it reads the target's `FullCache`
through `budget` selected prefix positions per layer and KV head and implements only `choose`.
Config names -> classes are in `POLICIES`; `make_policy` builds one from config values.

SqueezeAttention's layer-wise budgets compose with every token policy, so each has a
"squeeze_<name>" variant (e.g. "squeeze_h2o", "squeeze_retrieval"): a name, not a kwarg, keeps
the config flat (`policy: squeeze_h2o`) and the class a plain type; its own kwargs are
`squeeze_p` and `squeeze_groups`.
"""
from __future__ import annotations

import inspect

from triforce.cache import FullCache, RetrievalCache, SelectionCache
from triforce.models.llama import Transformer
from triforce.policies.alisa import ALISAPolicy
from triforce.policies.double_sparsity import DoubleSparsityPolicy, calibrate_channels
from triforce.policies.h2o import H2OPolicy
from triforce.policies.own import AttentionMassPolicy
from triforce.policies.quest import QuestPolicy
from triforce.policies.scissorhands import ScissorhandsPolicy
from triforce.policies.squeeze import SqueezeMixin, kmeans_1d, layer_budgets, squeeze
from triforce.policies.streaming import StreamingLLMPolicy

TOKEN_POLICIES: dict[str, type[SelectionCache]] = {
    "retrieval": RetrievalCache,
    "streaming": StreamingLLMPolicy,
    "h2o": H2OPolicy,
    "scissorhands": ScissorhandsPolicy,
    "alisa": ALISAPolicy,
    "double_sparsity": DoubleSparsityPolicy,
    "quest": QuestPolicy,
    "own": AttentionMassPolicy,
}
POLICIES: dict[str, type[SelectionCache]] = {
    **TOKEN_POLICIES, **{f"squeeze_{name}": squeeze(cls) for name, cls in TOKEN_POLICIES.items()},
}

_BASE_ARGS = {"self", "full", "model", "budget", "chunk_size", "reselect", "args", "kwargs"}


def policy_kwargs(cls: type) -> set[str]:
    """Names of the policy-specific keyword arguments `cls` accepts (over its __init__ chain)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass) and issubclass(klass, SelectionCache):
            names |= set(inspect.signature(klass.__init__).parameters) - _BASE_ARGS
    return names


def make_policy(name: str, full: FullCache, model: Transformer, budget: int, chunk_size: int = 8,
                reselect: str | int = "once", **kwargs) -> SelectionCache:
    """Build the middle-tier cache `name` reading `full` (the target's cache)."""
    if name not in POLICIES:
        raise ValueError(f"unknown cache policy {name!r}; valid: {', '.join(POLICIES)}")
    cls = POLICIES[name]
    unknown = set(kwargs) - policy_kwargs(cls)
    if unknown:
        valid = ", ".join(sorted(policy_kwargs(cls))) or "none"
        raise ValueError(f"policy {name!r} got unknown option(s) {', '.join(sorted(unknown))}; valid: {valid}")
    return cls(full, model, budget, chunk_size, reselect, **kwargs)


__all__ = [
    "POLICIES", "TOKEN_POLICIES", "make_policy", "policy_kwargs", "squeeze", "SqueezeMixin", "kmeans_1d",
    "layer_budgets", "calibrate_channels", "RetrievalCache", "StreamingLLMPolicy", "H2OPolicy",
    "ScissorhandsPolicy", "ALISAPolicy", "DoubleSparsityPolicy", "QuestPolicy", "AttentionMassPolicy",
]
