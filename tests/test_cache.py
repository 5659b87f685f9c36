"""What each cache lets a decode step attend to."""
import pytest
import torch
import torch.nn.functional as F

from triforce.cache import FullCache, RetrievalCache, StreamingCache
from triforce.lookup import LookupCache, PromptLookup
from triforce.models.llama import ModelArgs, apply_rope, build_model


@pytest.fixture(scope="module")
def model():
    args = ModelArgs(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64,
                     max_position_embeddings=512)
    return build_model(args, None, "cpu", torch.float32, seed=3).eval()


def qkv(t, heads=4, kv=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, heads, t, d, generator=g), torch.randn(1, kv, t, d, generator=g),
            torch.randn(1, kv, t, d, generator=g))


def reference(q, keys, vals, positions_q, rotary, key_positions=None):
    """Plain softmax attention of rotated q over already-rotated keys (GQA repeat)."""
    cos, sin = rotary.cos_sin(positions_q, q.dtype)
    q = apply_rope(q, cos, sin)
    rep = q.shape[1] // keys.shape[0]
    k, v = keys.repeat_interleave(rep, 0)[None], vals.repeat_interleave(rep, 0)[None]
    w = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return torch.softmax(w, -1) @ v


@torch.inference_mode()
def test_full_cache_attends_to_everything(model):
    cache = FullCache(model, 64)
    ids = torch.randint(0, 50, (1, 20))
    a = model(ids, cache)[0, -1]
    cache.truncate(19)  # rolling back one token and recomputing it gives the same logits
    b = model(ids[:, 19:], cache)[0, -1]
    assert torch.allclose(a, b, atol=1e-5)
    assert cache.length == 20


@torch.inference_mode()
def test_streaming_view_is_sinks_plus_window(model):
    cache = StreamingCache(model, sinks=2, window=5, slack=4, max_forward=8, position_shift=False)
    cache.n_layers = 1
    keys, vals = [], []
    for step in range(30):  # one token per step, as a draft decodes
        q, k, v = qkv(1, d=model.args.head_dim, seed=step)
        cache.begin(1)
        out = cache.attend(0, q, k, v)
        pos = torch.tensor([step])
        cos, sin = model.rotary.cos_sin(pos, torch.float32)
        keys.append(apply_rope(k, cos, sin)[0, :, 0]), vals.append(v[0, :, 0])
        cache.advance(1)
        seen = sorted(set(range(min(2, step + 1))) | set(range(max(0, step - 5), step + 1)))
        want = reference(q, torch.stack([keys[i] for i in seen], 1), torch.stack([vals[i] for i in seen], 1),
                         pos, model.rotary)
        assert torch.allclose(out, want, atol=1e-5), step
    assert cache.capacity < 30  # it really evicted
    cache.truncate(27)  # roll back within the slack
    with pytest.raises(ValueError, match="slack"):
        cache.truncate(10)


@torch.inference_mode()
@pytest.mark.parametrize("sinks", [0, 2])
def test_streaming_position_shift_uses_cache_positions(model, sinks):
    """Slot-rotated keys + re-rotated sinks give StreamingLLM's in-cache positions exactly: sinks at
    0.., the window right after them, the query last; through compactions and a rollback."""
    window = 5
    cache = StreamingCache(model, sinks=sinks, window=window, slack=4, max_forward=8, position_shift=True)
    cache.n_layers = 1
    keys, vals = [], []  # un-rotated
    step, rolled_back = 0, False
    while step < 40:
        q, k, v = qkv(1, d=model.args.head_dim, seed=step)
        cache.begin(1)
        out = cache.attend(0, q, k, v)
        cache.advance(1)
        if step == 25 and not rolled_back:  # roll back one token within the slack and redo it
            cache.truncate(25)
            rolled_back = True
            continue
        keys.append(k[0, :, 0]), vals.append(v[0, :, 0])
        seen = sorted(set(range(min(sinks, step + 1))) | set(range(max(sinks, step - window), step + 1)))
        pos = torch.arange(len(seen))  # positions inside the cache
        cos, sin = model.rotary.cos_sin(pos, torch.float32)
        rot = apply_rope(torch.stack([keys[i] for i in seen], 1), cos, sin)
        want = reference(q, rot, torch.stack([vals[i] for i in seen], 1), pos[-1:], model.rotary)
        assert torch.allclose(out, want, atol=1e-5), step
        step += 1
    assert cache.capacity < 40 and cache.start > sinks  # it really compacted


@torch.inference_mode()
def test_retrieval_keeps_sink_and_best_chunk_and_never_overwrites_target(model):
    full = FullCache(model, 128)
    model(torch.randint(0, 50, (1, 64)), full)
    kv = full.k.clone()
    ret = RetrievalCache(full, model, budget=8, chunk_size=4)
    ret.adopt_prefix(63)  # re-reads the target's last position: verified, so never rewritten
    ret.boundary, ret.full_view = 60, False
    query = full.k[0, 0, 36:40].mean(0).expand(1, 4, 1, -1).contiguous()  # chunk 9 summarised
    scores = ret.chunk_scores(0, query)
    idx = ret.choose(0, query)
    assert idx.shape == (2, 8)
    assert set(range(4)) <= set(idx[0].tolist())  # the sink chunk
    assert int(scores[0, 1:].argmax()) + 1 in {int(i) // 4 for i in idx[0]}  # the best other chunk
    ret.begin(1)
    model.layers[0].self_attn(torch.randn(1, 1, model.args.dim), ret, 0)
    assert torch.equal(full.k[:, :, :64], kv[:, :, :64])  # verified KV untouched


@torch.inference_mode()
def test_retrieval_with_budget_over_prefix_is_exact(model):
    ids = torch.randint(0, 50, (1, 40))
    full = FullCache(model, 64)
    want = model(ids, full)[0, -1]
    full.truncate(39)
    ret = RetrievalCache(full, model, budget=64, chunk_size=4)
    ret.adopt_prefix(39)
    got = model(ids[:, 39:], ret)[0, -1]
    assert ret.full_view and torch.allclose(want, got, atol=1e-5)


@torch.inference_mode()
def test_retrieval_reselect_intervals(model):
    full = FullCache(model, 200)
    model(torch.randint(0, 50, (1, 100)), full)
    for mode, expected in (("once", 1), ("round", 5), (2, 3)):
        ret = RetrievalCache(full, model, budget=16, chunk_size=4, reselect=mode)
        ret.adopt_prefix(99)
        for step in range(5):
            ret.begin_round()
            model(torch.randint(0, 50, (1, 1)), ret)
        assert ret.selections == expected, mode
        ret.truncate(99)
    with pytest.raises(ValueError, match="reselect"):
        RetrievalCache(full, model, budget=16, reselect="sometimes")


class _InPlaceRetrieval(RetrievalCache):
    """What RetrievalCache does over a resident store on the GPU: no copies, reads via sel_idx."""
    keeps_copies = False


@torch.inference_mode()
@pytest.mark.parametrize("reselect", ["once", "round"])
def test_retrieval_without_copies_or_stored_summaries_matches(model, reselect):
    """The GPU layout (selection read in place, summaries not kept under reselect=once) gives the
    same logits as gathered copies, through a selection step and later steps."""
    ids = torch.randint(0, 50, (1, 80))
    logits = []
    for cls in (RetrievalCache, _InPlaceRetrieval):
        full = FullCache(model, 128)
        model(ids[:, :70], full)
        ret = cls(full, model, budget=16, chunk_size=4, reselect=reselect)
        assert (ret.summaries is None) == (reselect == "once")
        ret.adopt_prefix(70)
        out = []
        for i in range(70, 78):
            ret.begin_round()
            out.append(model(ids[:, i:i + 1], ret)[0, -1])
        assert (ret.sel_k is None) == (cls is _InPlaceRetrieval) and not ret.full_view
        logits.append(torch.stack(out))
    torch.testing.assert_close(logits[1], logits[0])


@pytest.mark.parametrize("hist,want", [
    ([5, 6, 7, 8, 1, 5, 6, 7], 8),  # the 3-gram (5, 6, 7) occurred before: what followed it
    ([5, 6, 7, 9, 7, 3, 5, 6, 7], 9),  # the longest match wins over a more recent shorter one (7 -> 3)
    ([1, 2, 1, 3, 1], 3),  # equal lengths: the most recent occurrence
    ([1, 2, 3], 3),  # no earlier occurrence: the last token again
    ([4], 4),
])
def test_prompt_lookup_proposes_the_continuation_of_the_longest_recent_match(hist, want):
    assert int(PromptLookup(10).propose(torch.tensor(hist))) == want


def test_prompt_lookup_as_a_model_records_history_and_returns_one_hot_logits():
    look, cache = PromptLookup(10), LookupCache(16, "cpu")
    assert look(torch.tensor([[1, 2, 3, 1, 2]]), cache, last=0).shape == (1, 0, 10)
    logits = look(torch.tensor([[3]]), cache, last=1)  # ... 1 2 3 1 2 3 -> 1
    assert cache.length == 6 and logits.argmax(-1).item() == 1 and torch.isinf(logits).sum() == 9
    cache.truncate(4)
    assert look(torch.tensor([[9]]), cache, last=1).argmax(-1).item() == 9  # 1 2 3 1 9: nothing matches
    with pytest.raises(ValueError, match="exceed"):
        look(torch.zeros(1, 12, dtype=torch.long), cache, last=0)
