"""SqueezeAttention (Wang et al., 2024, "SqueezeAttention: 2D Management of KV-Cache in LLM
Inference via Layer-wise Optimal Budget"): layer-wise budgets on top of any token policy.

Why: layers differ in how much they change the hidden state; a layer whose output stays close to
its input (high cosine similarity) matters less, so its KV budget can go to layers that matter.

How: the cosine similarity between each block's input and output hidden states is measured on
the prompt *for free* during the target's own prefill: forward hooks on `model.layers` record it
for forwards over this policy's target `FullCache` (the mid tier shares the target's weights)
until the first selection; cost one cosine per token and layer (O(T*dim), negligible). A tiny
1-D K-means (k=3) groups the layers; the group with the highest similarity gets `p` * budget per
layer and the freed budget is spread evenly over the other layers (the total is kept, in chunk
multiples). No measurement (e.g. a prefill the hooks did not see) falls back to uniform budgets.

Per-layer budgets within one [L, KVH, max_budget, D] selection buffer: layer l's inner policy
chooses `budget_l` positions (its `budget` is set to budget_l for that call), the buffer row is
padded with unused prefix positions, and attention reads only the first budget_l rows
(`selected_kv`), so padding never changes the softmax. `squeeze(inner_cls)` builds the wrapper.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from triforce.cache import FullCache, SelectionCache
from triforce.models.llama import Transformer
from triforce.policies.base import HookedSelection


def kmeans_1d(x: list[float], k: int = 3, iters: int = 50) -> list[int]:
    """Cluster labels of the values x (k <= len(x) clusters, quantile init, Lloyd iterations)."""
    if not x:
        return []
    k = max(1, min(k, len(set(x))))
    s = sorted(x)
    centers = [s[round(i * (len(s) - 1) / max(k - 1, 1))] for i in range(k)]
    labels = [0] * len(x)
    for _ in range(iters):
        labels = [min(range(k), key=lambda j: abs(v - centers[j])) for v in x]
        new = [sum(v for v, l in zip(x, labels) if l == j) / max(labels.count(j), 1) if j in labels else centers[j]
               for j in range(k)]
        if new == centers:
            break
        centers = new
    return labels


def layer_budgets(similarity: list[float], budget: int, chunk: int, p: float = 0.5, k: int = 3) -> list[int]:
    """Per-layer budgets (chunk multiples >= chunk) summing to len(similarity) * budget (when budget
    is a chunk multiple): the most similar K-means group gets p * budget, the others share the rest."""
    if not 0 < p <= 1:
        raise ValueError(f"squeeze p must be in (0, 1], got {p}")
    n = len(similarity)
    labels = kmeans_1d(similarity, k)
    groups = sorted(set(labels), key=lambda j: sum(s for s, l in zip(similarity, labels) if l == j) / labels.count(j))
    if len(groups) < 2:
        return [budget] * n
    low = groups[-1]  # highest cosine similarity: least important
    small = max(chunk, int(budget * p) // chunk * chunk)
    out = [small if l == low else budget for l in labels]
    others = sorted((i for i in range(n) if labels[i] != low), key=lambda i: similarity[i])  # most important first
    spare = (n * budget - sum(out)) // chunk  # chunks to hand out
    for j in range(spare):
        out[others[j % len(others)]] += chunk
    return out


class SqueezeMixin(HookedSelection):
    """Layer-wise budgets for the token policy it is mixed before (see `squeeze`)."""

    graph_ready = False  # per-layer budgets: the GPU graph path reads one budget for every layer

    def __init__(self, full: FullCache, model: Transformer, budget: int, chunk_size: int = 8,
                 reselect: str | int = "once", squeeze_p: float = 0.5, squeeze_groups: int = 3, **kwargs):
        if not 0 < squeeze_p <= 1:
            raise ValueError(f"squeeze_p must be in (0, 1], got {squeeze_p}")
        if squeeze_groups < 1:
            raise ValueError(f"squeeze_groups must be >= 1, got {squeeze_groups}")
        self.squeeze_p, self.squeeze_groups = squeeze_p, squeeze_groups
        self.sim_sum = [0.0] * model.args.n_layers
        self.sim_count = [0] * model.args.n_layers
        super().__init__(full, model, budget, chunk_size, reselect, **kwargs)
        self.nominal = self.budget
        me = weakref.ref(self)
        self._hooks = [blk.register_forward_hook(lambda mod, args, out, i=i: _record(me, i, args, out))
                       for i, blk in enumerate(model.layers)]

    def __del__(self):
        for h in getattr(self, "_hooks", []):
            h.remove()

    def reset(self) -> None:
        super().reset()
        self.sim_sum = [0.0] * self.n_layers
        self.sim_count = [0] * self.n_layers
        self.budgets: list[int] | None = None
        if hasattr(self, "nominal"):
            self.budget = self.nominal

    @property
    def similarity(self) -> list[float] | None:
        """Mean input/output cosine similarity per layer over the recorded prompt tokens."""
        if not all(self.sim_count):
            return None
        return [s / c for s, c in zip(self.sim_sum, self.sim_count)]

    def begin(self, n_new: int) -> None:
        super().begin(n_new)
        if self.selecting and self.budgets is None:
            sim = self.similarity
            self.budgets = ([self.nominal] * self.n_layers if sim is None else
                            layer_budgets(sim, self.nominal, self.chunk, self.squeeze_p, self.squeeze_groups))
            self.budget = max(self.budgets)
            if self.sel_k is not None and self.sel_k.shape[2] != self.budget:
                self.sel_k = self.sel_v = None  # reallocated at this budget by the selection
        if self.selecting:
            self.full_view = self.budget >= self.boundary

    def choose(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        cap, self.budget = self.budget, self.budgets[layer]
        try:
            pos = super().choose(layer, q)
        finally:
            self.budget = cap
        if pos.shape[1] < cap:  # pad with unused positions; attention never reads them
            free = torch.ones(self.n_kv_heads, self.boundary, dtype=torch.bool, device=self.device)
            free.scatter_(1, pos, False)
            pad = free.float().topk(cap - pos.shape[1], dim=-1, sorted=True).indices
            pos = torch.cat((pos, pad), dim=1)
        return pos

    def selected_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.budgets[layer]
        return self.sel_k[layer, :, :n], self.sel_v[layer, :, :n]


def _record(ref, layer: int, args: tuple, out: tuple) -> None:
    """Hook on Block.forward(x, delta, cache, layer, fused) -> (x, delta): compares the residual
    stream (x + delta) before and after the block, for forwards over the target's own cache."""
    self = ref()
    if self is None or self.selections or len(args) < 3 or args[2] is not self.full:
        return
    before = args[0] if args[1] is None else args[0] + args[1]
    cos = F.cosine_similarity(before.float(), (out[0] + out[1]).float(), dim=-1)
    self.sim_sum[layer] += float(cos.sum())
    self.sim_count[layer] += cos.numel()


_CLASSES: dict[type, type] = {}


def squeeze(inner: type[SelectionCache]) -> type[SelectionCache]:
    """The SqueezeAttention wrapper of a token policy class (cached, so one class per policy)."""
    if not issubclass(inner, SelectionCache):
        raise ValueError(f"squeeze wraps SelectionCache policies, got {inner!r}")
    if inner not in _CLASSES:
        _CLASSES[inner] = type(f"Squeeze{inner.__name__}", (SqueezeMixin, inner), {})
    return _CLASSES[inner]
