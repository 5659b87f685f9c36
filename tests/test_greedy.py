"""Greedy equality on real weights: speculative pipelines emit exactly the autoregressive ids."""
import os
from pathlib import Path

import pytest

import triforce

CORPUS = Path(__file__).resolve().parents[1] / "data" / "corpus"
PROSE = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
         "foolishness, it was the epoch of belief, it was the epoch of incredulity. ") * 40


@pytest.fixture(scope="module")
def generators():
    common = [f"dtype={os.environ.get('TRIFORCE_TEST_DTYPE', 'float32')}", "temperature=0", "cache.budget=128", "cache.chunk_size=8", "gamma=5", "draft.gamma=3",
              "draft.sinks=4", "draft.window=60", "prefill_chunk=256"]
    # pipeline=draft on SmolLM2 is a self-draft over a StreamingLLM cache (no smaller model shares its tokenizer)
    gens = {p: triforce.load(f"pipeline={p}", *common) for p in ("autoregressive", "retrieval", "triforce", "draft")}
    # target KV in (pinned) host memory, streamed per target forward; on a GPU the planner keeps
    # some layers resident and the retrieval tier runs graphs over the store's device mirror
    gens["triforce_offloaded"] = triforce.load("pipeline=triforce", "offload=true", *common)
    gens["triforce_lookup"] = triforce.load("+model=smollm2-135m", "model.draft_path=lookup", "pipeline=triforce", *common)
    # quantized drafts (the target keeps its weights): int8 middle + int4 tiny, and one int4 copy serving both
    gens["triforce_int8_int4"] = triforce.load("pipeline=triforce", "cache.weights=int8", "draft.weights=int4", *common)
    gens["triforce_int4"] = triforce.load("pipeline=triforce", "cache.weights=int4", "draft.weights=int4", *common)
    return gens


def prompts(gen):
    long_text = PROSE
    return {
        "short_chat": gen.encode("Name three colours.", chat=True),
        # longer than the retrieval budget (128) and the streaming window: the drafts really are sparse
        "long_prose": gen.encode(long_text, chat=False)[:1200],
        # the answer is a word or two, so EOS arrives inside a draft
        "eos_in_draft": gen.encode("Answer yes or no: is the sky blue?", chat=True),
    }


@pytest.mark.parametrize("pipeline", ["retrieval", "triforce", "triforce_offloaded", "triforce_lookup", "draft",
                                      "triforce_int8_int4", "triforce_int4"])
def test_greedy_equals_autoregressive(generators, pipeline):
    ar, spec = generators["autoregressive"], generators[pipeline]
    for name, ids in prompts(ar).items():
        want = ar.generate(ids, max_new_tokens=32)
        got = spec.generate(ids, max_new_tokens=32)
        assert got.token_ids == want.token_ids, f"{pipeline} differs from autoregressive on {name}"
        if name == "long_prose":
            assert len(ids) > 128 and got.stats["tiers"]["target"]["rounds"] > 0
        if name == "eos_in_draft":
            assert want.token_ids[-1] in ar.stop_ids and len(want.token_ids) < 5


TINY_DRAFT = "model.draft_args={vocab_size: 64, dim: 32, n_layers: 1, n_heads: 2, n_kv_heads: 1, " \
             "intermediate_size: 64, max_position_embeddings: 2048}"

TINY_COMMON = ["+model=tiny-random", "temperature=0", "gamma=4", "draft.gamma=2"]


@pytest.fixture(scope="module")
def tiny_random_ar():
    ar = triforce.load(*TINY_COMMON, "pipeline=autoregressive")
    prompts = ("a short prompt", "a longer prompt than the streaming window " * 3)
    return {p: ar.generate(p, max_new_tokens=40).token_ids for p in prompts}


@pytest.mark.parametrize("pipeline,draft,cache", [
    ("draft", [TINY_DRAFT], "full"),  # a separate random draft over its own full KV (the classic pipeline)
    ("draft", [TINY_DRAFT, "draft.cache=streaming"], "streaming"),
    ("triforce", [TINY_DRAFT], "streaming"),
    ("triforce", [TINY_DRAFT, "draft.cache=full"], "full"),
    ("draft", ["draft.cache=full"], "full"),  # self-draft of layer 0 over a full KV: accepts some, rejects some
    ("draft", ["model.draft_path=lookup"], None),
], ids=["draft-full", "draft-streaming", "triforce-streaming", "triforce-full", "draft-self-full", "draft-lookup"])
def test_tiny_random_greedy_equals_autoregressive(tiny_random_ar, pipeline, draft, cache):
    spec = triforce.load(*TINY_COMMON, f"pipeline={pipeline}", *draft)
    assert spec.draft_cache == cache
    for prompt, want in tiny_random_ar.items():
        got = spec.generate(prompt, max_new_tokens=40)
        assert got.token_ids == want, f"{pipeline} {draft} differs from autoregressive on {prompt!r}"
        assert got.stats["tiers"]["target"]["rounds"] > 0
