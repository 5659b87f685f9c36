"""Offloaded target KV (GitHub issue 5): same logits and tokens as FullCache; the memory planner."""
import pytest
import torch

from triforce.cache import FullCache, RetrievalCache, StreamingCache
from triforce import offload
from triforce.engine import SpeculativeEngine, Tier
from triforce.models.llama import ModelArgs, build_model
from triforce.offload import OffloadedFullCache, merge_blocks, partial_attention
from triforce.planner import GiB, MemoryPlan, plan_memory

MAX_LEN = 400


@pytest.fixture(autouse=True)
def _one_thread(_threads):
    """Tiny tensors: a second OpenMP thread only adds waits (80x slower on a loaded 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    args = ModelArgs(vocab_size=64, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, intermediate_size=128,
                     max_position_embeddings=1024)
    return build_model(args, None, "cpu", torch.float32).eval()


def ids(n, seed=0):
    return torch.randint(0, 64, (1, n), generator=torch.Generator().manual_seed(seed))


def run_steps(model, cache, tokens):
    """Chunked prefill (T=64 after a 64-token prefix), a decode step, verify steps, a rollback."""
    out = []
    for s in range(0, 250, 64):
        out.append(model(tokens[:, s:min(250, s + 64)], cache)[0])
    out.append(model(tokens[:, 250:251], cache)[0])  # decode
    out.append(model(tokens[:, 251:258], cache)[0])  # verify gamma=6
    cache.truncate(253)  # 2 of the 6 drafts accepted
    out.append(model(tokens[:, 253:260], cache)[0])
    cache.truncate(200)  # a deep rollback, then a longer chunk
    out.append(model(tokens[:, 200:300], cache)[0])
    return torch.cat(out)


@pytest.mark.parametrize("resident,chunk", [(0, None), (0, 48), (1, 100), (2, 7), (3, 48)])
@torch.inference_mode()
def test_offloaded_logits_equal_full_cache(model, resident, chunk):
    tokens = ids(300)
    want = run_steps(model, FullCache(model, MAX_LEN), tokens)
    cache = OffloadedFullCache(model, MAX_LEN, resident_layers=resident, transfer_chunk=chunk, stage_device="cpu")
    got = run_steps(model, cache, tokens)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert cache.length == 300
    if chunk is None and resident == 0:
        assert torch.equal(got, want)  # one SDPA over the staged layer: bit-identical to FullCache


@torch.inference_mode()
def test_query_blocks_of_merged_attention(model, monkeypatch):
    monkeypatch.setattr(offload, "SCORE_BLOCK", 4 * 48 * 3)  # 3 queries per block against a 48-token piece
    tokens = ids(300, seed=5)
    want = run_steps(model, FullCache(model, MAX_LEN), tokens)
    got = run_steps(model, OffloadedFullCache(model, MAX_LEN, transfer_chunk=48), tokens)
    assert torch.allclose(got, want, atol=1e-5)


@torch.inference_mode()
def test_merged_attention_is_softmax_over_the_union():
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(4, 5, 8, generator=g), torch.randn(2, 30, 8, generator=g), torch.randn(2, 30, 8, generator=g)
    want, _ = partial_attention(q, k, v, causal=True)
    acc = None
    for a, b in ((0, 11), (11, 25)):  # prefix pieces: every key precedes every query
        acc = merge_blocks(acc, partial_attention(q, k[:, a:b], v[:, a:b], causal=False))
    got, _ = merge_blocks(acc, partial_attention(q, k[:, 25:], v[:, 25:], causal=True))
    assert torch.allclose(got, want, atol=1e-5)


@torch.inference_mode()
def test_store_api_reads_host_and_tail_like_full_cache(model):
    full = FullCache(model, MAX_LEN)
    off = OffloadedFullCache(model, MAX_LEN, resident_layers=1, stage_device="cpu")  # whole layers: bit-exact
    tokens = ids(200, seed=2)
    for c in (full, off):
        model(tokens[:, :120], c)
    off.keep_tail(96)
    for c in (full, off):
        model(tokens[:, 120:130], c)
    g = torch.Generator().manual_seed(3)
    spec_k, spec_v = torch.randn(2, 4, 16, generator=g), torch.randn(2, 4, 16, generator=g)
    for layer in range(3):
        # a draft's speculative tokens past the target's length land in the store (and the mirror)
        off.write(layer, 130, spec_k, spec_v)
        full.k[layer, :, 130:134], full.v[layer, :, 130:134] = spec_k, spec_v
        for a, b in ((0, 134), (90, 134), (100, 134), (5, 60)):  # host only, host + tail, tail only
            k, v = off.read(layer, a, b)
            assert torch.equal(k, full.k[layer, :, a:b]) and torch.equal(v, full.v[layer, :, a:b])
            assert torch.equal(off.read_k(layer, a, b), full.k[layer, :, a:b])
        idx = torch.randint(0, 96, (2, 24), generator=g)
        out_k, out_v = torch.empty(2, 24, 16), torch.empty(2, 24, 16)
        off.gather(layer, idx, out_k, out_v)
        i = idx[..., None].expand(-1, -1, 16)
        assert torch.equal(out_k, full.k[layer].gather(1, i)) and torch.equal(out_v, full.v[layer].gather(1, i))
        assert torch.equal(off.k[layer, :, :134], full.k[layer, :, :134])  # FullCache-style indexing
    off.keep_tail(128)  # a later re-selection moves the mirror up: refilled from host, speculative tokens too
    assert torch.equal(off.read(2, 128, 134)[0], full.k[2, :, 128:134])


def engine(model, offloaded: bool):
    target = (OffloadedFullCache(model, MAX_LEN, resident_layers=1, transfer_chunk=50, stage_device="cpu")
              if offloaded else FullCache(model, MAX_LEN))
    tiers = [Tier("target", model, target, gamma=5),
             Tier("retrieval", model, RetrievalCache(target, model, budget=64, chunk_size=8), gamma=3),
             Tier("tiny", model, StreamingCache(model, sinks=4, window=32, slack=16, max_forward=64))]
    return SpeculativeEngine(tiers, temperature=0.0, top_p=1.0, prefill_chunk=64)


@torch.inference_mode()
def test_three_tier_engine_greedy_equal(model):
    prompt = ids(260, seed=4)[0]
    ref, off = engine(model, False), engine(model, True)
    want = ref.generate(prompt, 40)
    got = off.generate(prompt, 40)
    assert got == want and len(got) == 40
    # same drafts and verdicts at every tier, not only the same output
    for name in ("target", "retrieval"):
        a, b = ref.stats(40)[name], off.stats(40)[name]
        assert (a["proposed"], a["accepted"]) == (b["proposed"], b["accepted"]), name
    assert ref.stats(40)["target"]["accepted"] > 0  # the run really speculated
    assert off.generate(prompt, 40) == want  # a second call resets the store and the mirror


@torch.inference_mode()
def test_batched_offloaded_rows_equal_their_single_resident_runs(model):
    """offload=true with several prompts: every row has its own host store, staging slots and mirror
    behind `Rows`, and each greedy row equals the resident single run of its prompt, three tiers deep."""
    from triforce.cache import Rows

    prompts = [ids(n, seed=10 + n)[0] for n in (260, 120, 200)]
    ref = engine(model, False)
    want = [ref.generate(p, 24) for p in prompts]
    full = Rows.build(lambda b: OffloadedFullCache(model, MAX_LEN, resident_layers=1, transfer_chunk=50,
                                                   stage_device="cpu"), 3)
    tiers = [Tier("target", model, full, gamma=5),
             Tier("retrieval", model, Rows.build(lambda b: RetrievalCache(full.rows[b], model, budget=64, chunk_size=8), 3),
                  gamma=3),
             Tier("tiny", model, Rows.build(lambda b: StreamingCache(model, sinks=4, window=32, slack=16, max_forward=64), 3))]
    got = SpeculativeEngine(tiers, temperature=0.0, top_p=1.0, prefill_chunk=64).generate_batch(prompts, 24)
    assert got == want
    assert len({id(r.host_k) for r in full.rows}) == 3  # no row shares another's store


def test_plan_offloads_a_batch_only_when_asked():
    """A batch that does not fit the GPU: offload=auto refuses it with the GiB per row (it would be
    bound by the host link), offload=true offloads every row with its own staging slots and mirror."""
    with pytest.raises(ValueError, match=r"a batch of 2 rows of up to 131072 tokens needs .* per row"):
        plan_memory(LLAMA2_7B, 131072, 4096, 6, LLAMA_68M, 2, 80 * GiB, 512 * GiB, "auto", batch=2)
    one = plan_memory(LLAMA2_7B, 131072, 4096, 6, LLAMA_68M, 2, 80 * GiB, 512 * GiB, "true")
    two = plan_memory(LLAMA2_7B, 131072, 4096, 6, LLAMA_68M, 2, 80 * GiB, 512 * GiB, "true", batch=2)
    assert two.offload and two.host_needed > one.host_needed
    for part in ("staging", "retrieval"):
        assert two.gpu_parts[part] == 2 * one.gpu_parts[part], part
    per_layer = [p.gpu_parts["mirror"] // p.offloaded_layers for p in (one, two)]  # a mirror per offloaded layer
    assert per_layer[1] == 2 * per_layer[0]
    assert two.resident_layers < one.resident_layers  # the second row's KV takes room from resident layers


def test_offloaded_cache_rejects_bad_arguments(model):
    with pytest.raises(ValueError, match="resident_layers must be in 0..3"):
        OffloadedFullCache(model, 64, resident_layers=4)
    with pytest.raises(ValueError, match="transfer_chunk must be >= 1"):
        OffloadedFullCache(model, 64, transfer_chunk=0)
    with pytest.raises(ValueError, match="stage_device meta must be the model's device"):
        OffloadedFullCache(model, 64, stage_device="meta")
    cache = OffloadedFullCache(model, 64)
    with pytest.raises(ValueError, match="exceed the cache's 64"):
        model(ids(65), cache)


# ------------------------------------------------------------------------------------- planner
LLAMA2_7B = ModelArgs(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, intermediate_size=11008)
LLAMA_68M = ModelArgs(vocab_size=32000, dim=768, n_layers=2, n_heads=12, n_kv_heads=12, intermediate_size=3072)


def plan(gpu_gib, host_gib=128, offload="auto", context=131072, budget=4096):
    return plan_memory(LLAMA2_7B, context, budget, 6, LLAMA_68M, 2, gpu_gib * GiB, host_gib * GiB, offload)


def test_plan_offloads_layers_and_keeps_the_budget_on_a_24gib_gpu():
    p = plan(24)
    assert isinstance(p, MemoryPlan)
    assert (p.offload, p.resident_layers, p.offloaded_layers, p.budget, p.transfer_chunk) == (True, 0, 32, 4096, 16384)
    assert p.gpu_needed <= 24 * GiB and p.host_needed == 32 * (131073 * 16 * 1024)
    text = p.describe()
    assert "Target KV: 0 of 32 layers on the GPU, 32 in pinned host memory (64.0 of 128.0 GiB)" in text
    assert "weights 12.6" in text and "Retrieval budget 4096 tokens on the GPU." in text


def test_plan_keeps_everything_resident_when_it_fits():
    p = plan(80, context=32768)
    assert (p.offload, p.resident_layers, p.budget) == (False, 32, 4096)
    assert "all 32 layers on the GPU, no offloading" in p.describe()
    forced = plan(80, context=32768, offload="true")
    assert forced.offload and forced.offloaded_layers == 1  # true: at least one layer goes to the host
    assert plan(80).resident_layers == 28  # 128K on an 80 GiB GPU: 4 layers offloaded


def test_plan_lowers_the_retrieval_budget_when_needed():
    p = plan(20)
    assert (p.resident_layers, p.budget, p.requested_budget) == (0, 1024, 4096)
    assert "Retrieval budget lowered from 4096 to 1024 tokens to fit the GPU." in p.describe()


def test_plan_counts_cuda_graph_pools():
    """Each tier's captured steps hold a pool (logits, sampling, activations, split-K workspace)."""
    p = plan_memory(LLAMA2_7B, 32768, 4096, 12, LLAMA_68M, 2, 80 * GiB, 128 * GiB, draft_gamma=4)
    assert p.graph_steps == {"target": 2, "retrieval": 2, "tiny": 3}
    assert 40 * 2**20 < p.gpu_parts["graphs"] < 400 * 2**20
    assert "CUDA graph pools" in p.describe() and "7 step graphs: target 2, retrieval 2, tiny 3" in p.describe()
    off = plan_memory(LLAMA2_7B, 32768, 4096, 12, LLAMA_68M, 2, 80 * GiB, 128 * GiB, draft_gamma=4, cuda_graphs=False)
    assert off.gpu_needed == p.gpu_needed - p.gpu_parts["graphs"] and "CUDA graph pools" not in off.describe()
    ar = plan_memory(LLAMA2_7B, 32768, 0, 12, None, 2, 80 * GiB, 128 * GiB)
    assert ar.graph_steps == {"target": 3}  # the target decodes 1-3 tokens when nothing drafts for it
    bigger = plan_memory(LLAMA2_7B, 32768, 4096, 24, LLAMA_68M, 2, 80 * GiB, 128 * GiB, draft_gamma=4)
    assert bigger.gpu_parts["graphs"] > p.gpu_parts["graphs"]  # longer verify steps, bigger graphs


def test_plan_refusals_name_the_numbers():
    with pytest.raises(ValueError, match=r"the target's weights alone need 12\.6 GiB .* but the GPU has 8\.0 GiB"):
        plan(8)
    with pytest.raises(ValueError, match=r"offloading 32 of 32 target layers needs 64\.0 GiB of pinned host "
                                         r"memory but 32\.0 GiB is available"):
        plan(24, host_gib=32)
    with pytest.raises(ValueError, match=r"131072 tokens need 83\.6 GiB of GPU memory \(target KV 64\.0 GiB\) but "
                                         r"80\.0 GiB is available: set offload=auto"):
        plan(80, offload="false")
    with pytest.raises(ValueError, match=r"retrieval chunk summaries 4\.0\) but 16\.0 GiB is available"):
        plan(16)
    with pytest.raises(ValueError, match="offload must be auto, true or false"):
        plan(80, offload="maybe")
    assert plan(80, context=32768, offload=False).offload is False  # YAML booleans are accepted
