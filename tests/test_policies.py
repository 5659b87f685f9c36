"""KV-selection policies as middle-tier draft caches: valid selections, lossless greedy decoding in
2- and 3-tier pipelines, views that really differ from full attention, and the helpers."""
from __future__ import annotations

import pytest
import torch

from triforce.cache import FullCache, RetrievalCache, StreamingCache
from triforce.engine import SpeculativeEngine, Tier
from triforce.models.llama import ModelArgs, build_model
from triforce.policies import POLICIES, DoubleSparsityPolicy, make_policy, squeeze
from triforce.policies.base import HookedSelection, fake_quant
from triforce.policies.squeeze import kmeans_1d, layer_budgets
from triforce.policies.streaming import StreamingLLMPolicy

PROMPT_LEN, BUDGET, CHUNK, N_NEW, MAX_LEN = 120, 32, 4, 24, 256
# every policy, plus the options that change how the selected KV is read
CONFIGS = [(name, {}) for name in POLICIES] + [
    ("scissorhands", {"kv_bits": 4}), ("alisa", {"kv_bits": 8}), ("h2o", {"recent_ratio": 0.25}),
    ("squeeze_scissorhands", {"kv_bits": 4}),
]
IDS = [name + "".join(f"-{k}={v}" for k, v in kw.items()) for name, kw in CONFIGS]


def tiny_model(n_layers: int = 2, seed: int = 0):
    args = ModelArgs(vocab_size=64, dim=64, n_layers=n_layers, n_heads=4, n_kv_heads=2,
                     intermediate_size=128, max_position_embeddings=512)
    return build_model(args, None, "cpu", torch.float32, seed=seed)


@pytest.fixture(autouse=True)
def no_grad():
    with torch.inference_mode():
        yield


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return tiny_model(2, 0), tiny_model(1, 1)


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, 64, (PROMPT_LEN,), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def reference(models, prompt):
    model, _ = models
    return SpeculativeEngine([Tier("target", model, FullCache(model, MAX_LEN))], temperature=0.0,
                             top_p=1.0, prefill_chunk=64).generate(prompt, N_NEW)


def prefilled(model, prompt, name, **kw):
    """(full, policy) with the prompt but its last token absorbed by the target and adopted."""
    full = FullCache(model, MAX_LEN)
    model(prompt[None, :-1], full, last=0)
    cache = make_policy(name, full, model, BUDGET, CHUNK, "once", **kw)
    cache.adopt_prefix(PROMPT_LEN - 1)
    return full, cache


@pytest.mark.parametrize("name,kw", CONFIGS, ids=IDS)
def test_choose_returns_valid_positions(models, prompt, name, kw):
    model, _ = models
    full, cache = prefilled(model, prompt, name, **kw)
    t = PROMPT_LEN - cache.length
    cache.begin(t)
    assert cache.selecting and not cache.full_view
    q = torch.randn(1, model.args.n_heads, t, model.args.head_dim)
    for layer in range(model.args.n_layers):
        pos = cache.choose(layer, q)
        assert pos.dtype == torch.long and pos.shape == (model.n_kv_heads, cache.budget)
        assert int(pos.min()) >= 0 and int(pos.max()) < cache.boundary
        assert all(row.unique().numel() == cache.budget for row in pos)


@pytest.mark.parametrize("name,kw", CONFIGS, ids=IDS)
def test_greedy_equals_autoregressive(models, prompt, reference, name, kw):
    model, tiny = models
    for three_tier in (True, False):
        for reselect in ("once", "round"):
            full = FullCache(model, MAX_LEN)
            mid = make_policy(name, full, model, BUDGET, CHUNK, reselect, **kw)
            tiers = [Tier("target", model, full, gamma=4), Tier("mid", model, mid, gamma=3)]
            if three_tier:
                tiers.append(Tier("tiny", tiny, StreamingCache(tiny, 2, 8, max_forward=64)))
            engine = SpeculativeEngine(tiers, temperature=0.0, top_p=1.0, prefill_chunk=64)
            assert engine.generate(prompt, N_NEW) == reference, (three_tier, reselect)
            assert mid.selections >= 1 and not mid.full_view
            assert engine.stats(N_NEW)["target"]["proposed"] > 0


@pytest.mark.parametrize("name,kw", CONFIGS, ids=IDS)
def test_sampling_runs(models, prompt, name, kw):
    model, tiny = models
    full = FullCache(model, MAX_LEN)
    tiers = [Tier("target", model, full, gamma=4),
             Tier("mid", model, make_policy(name, full, model, BUDGET, CHUNK, 8, **kw), gamma=3),
             Tier("tiny", tiny, StreamingCache(tiny, 2, 8, max_forward=64))]
    out = SpeculativeEngine(tiers, temperature=1.0, top_p=0.9, prefill_chunk=64).generate(prompt, N_NEW, seed=3)
    assert len(out) == N_NEW and all(0 <= t < 64 for t in out)


@pytest.mark.parametrize("name,kw", CONFIGS, ids=IDS)
def test_view_differs_from_full_attention(models, prompt, name, kw):
    model, _ = models
    full, cache = prefilled(model, prompt, name, **kw)
    mid = model(prompt[None, cache.length:], cache)[:, -1]  # `own` re-reads its observation window
    target = model(prompt[None, -1:], full)[:, -1]
    assert not cache.full_view
    assert (mid - target).abs().max() > 1e-6


def test_full_view_when_budget_covers_prefix(models, prompt):
    model, _ = models
    full = FullCache(model, MAX_LEN)
    model(prompt[None, :-1], full, last=0)
    cache = make_policy("h2o", full, model, 128, CHUNK)
    cache.adopt_prefix(PROMPT_LEN - 1)
    last = prompt[None, -1:]
    torch.testing.assert_close(model(last, cache), model(last, full))


def test_make_policy_errors(models):
    model, _ = models
    full = FullCache(model, MAX_LEN)
    with pytest.raises(ValueError, match="valid: retrieval"):
        make_policy("nope", full, model, BUDGET, CHUNK)
    with pytest.raises(ValueError, match="unknown option"):
        make_policy("h2o", full, model, BUDGET, CHUNK, sinks=3)
    with pytest.raises(ValueError, match="recent_ratio"):
        make_policy("h2o", full, model, BUDGET, CHUNK, recent_ratio=2.0)
    with pytest.raises(ValueError, match="kv_bits"):
        make_policy("alisa", full, model, BUDGET, CHUNK, kv_bits=3)
    with pytest.raises(ValueError, match="channels"):
        make_policy("double_sparsity", full, model, BUDGET, CHUNK, channels=1000)
    with pytest.raises(ValueError, match="sinks"):
        make_policy("streaming", full, model, BUDGET, CHUNK, sinks=BUDGET)
    assert isinstance(make_policy("retrieval", full, model, BUDGET, CHUNK), RetrievalCache)


def test_double_sparsity_offline_calibration(models, prompt):
    model, _ = models
    full, cache = prefilled(model, prompt, "double_sparsity", channels=4)
    assert isinstance(cache, DoubleSparsityPolicy)
    ch = cache.calibrate(torch.arange(64))
    assert ch.shape == (2, 2, 4) and int(ch.max()) < model.args.head_dim
    cache.begin(1)
    pos = cache.choose(0, torch.randn(1, 4, 1, 16))
    assert pos.shape == (2, cache.budget)


def test_kmeans_and_layer_budgets():
    labels = kmeans_1d([0.1, 0.12, 0.5, 0.52, 0.9, 0.91], 3)
    assert labels[0] == labels[1] != labels[2] == labels[3] != labels[4] == labels[5]
    sims = [0.2, 0.5, 0.9, 0.92, 0.88, 0.3]
    b = layer_budgets(sims, 64, 8, p=0.5)
    assert sum(b) == 6 * 64 and all(x % 8 == 0 and x >= 8 for x in b)
    assert b[2] == b[3] == b[4] == 32 and min(b[0], b[5]) > 64
    assert layer_budgets([0.5, 0.5, 0.5], 64, 8) == [64, 64, 64]


def test_squeeze_measures_prefill_and_slices(models, prompt):
    model, _ = models
    full, cache = prefilled(model, prompt, "squeeze_retrieval")
    assert cache.similarity is None  # the prefill ran before the policy existed
    full = FullCache(model, MAX_LEN)
    cache = squeeze(RetrievalCache)(full, model, BUDGET, CHUNK)
    model(prompt[None, :-1], full, last=0)
    cache.adopt_prefix(PROMPT_LEN - 1)
    assert cache.similarity is not None and len(cache.similarity) == 2
    model(prompt[None, -1:], cache)
    assert sum(cache.budgets) == 2 * BUDGET and len(set(cache.budgets)) == 2
    assert cache.budget == max(cache.budgets) == cache.sel_k.shape[2]
    assert [cache.selected_kv(i)[0].shape[1] for i in range(2)] == cache.budgets


def test_fake_quant_error_shrinks_with_bits():
    x = torch.randn(4, 16, 32)
    errs = [(fake_quant(x, b) - x).abs().max().item() for b in (2, 4, 8)]
    assert errs[0] > errs[1] > errs[2] > 0
