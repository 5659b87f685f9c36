"""The CUDA-graph code path (device-side lengths, static shapes, split-K kernel) computes what
the eager path computes. On CPU it runs uncaptured, with the Triton kernel interpreted."""
import gc
import os
import warnings

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest

from triforce.cache import FullCache, RetrievalCache, StreamingCache
from triforce.engine import SpeculativeEngine, Tier
from triforce.graphs import GraphedModel, graph_sizes
from triforce.offload import OffloadedFullCache

pytest.importorskip("triton")
CAPTURE = torch.cuda.is_available()
DEVICE = "cuda" if CAPTURE else "cpu"


def pipeline(target, tiny, n, graphs: bool, offloaded: bool = False):
    full = OffloadedFullCache(target, n, resident_layers=1, transfer_chunk=40) if offloaded else FullCache(target, n)
    tiers = [Tier("target", target, full, gamma=4),
             Tier("retrieval", target, RetrievalCache(full, target, 32, 4), gamma=3),
             Tier("tiny", tiny, StreamingCache(tiny, 2, 12, slack=16, max_forward=64))]
    if graphs:
        for level, t in enumerate(tiers):
            t.graphed = GraphedModel(t.model, t.cache, graph_sizes(tiers, level), capture=CAPTURE)
    return tiers


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_graph_path_matches_eager(models, temperature):
    target, tiny = models
    prompt = torch.randint(0, 64, (150,), generator=torch.Generator().manual_seed(1))
    outs = []
    for graphs in (False, True):
        eng = SpeculativeEngine(pipeline(target, tiny, 260, graphs), temperature, 1.0, prefill_chunk=64)
        outs.append(eng.generate(prompt, 40, seed=3))
        if graphs:
            assert sum(t.graphed.cache.length > 0 for t in eng.tiers) == 3
    assert outs[0] == outs[1]
    if temperature == 0:
        ar = SpeculativeEngine([Tier("target", target, FullCache(target, 260))], 0.0, 1.0, prefill_chunk=64)
        assert ar.generate(prompt, 40) == outs[0]


def test_draft_pipeline_graph_path_matches_eager(models, temperature=0.0):
    """pipeline=draft: the tiny draft over its own FullCache, verified by the target directly."""
    target, tiny = models
    prompt = torch.randint(0, 64, (150,), generator=torch.Generator().manual_seed(2))
    outs = []
    for graphs in (False, True):
        tiers = [Tier("target", target, FullCache(target, 260), gamma=5), Tier("tiny", tiny, FullCache(tiny, 260))]
        if graphs:
            for level, t in enumerate(tiers):
                t.graphed = GraphedModel(t.model, t.cache, graph_sizes(tiers, level), capture=CAPTURE)
        eng = SpeculativeEngine(tiers, temperature, 1.0, prefill_chunk=64)
        outs.append(eng.generate(prompt, 40, seed=3))
        assert 0 < eng.tiers[0].stats.accepted < eng.tiers[0].stats.proposed  # some drafts accepted, some not
    assert outs[0] == outs[1]
    if temperature == 0:
        ar = SpeculativeEngine([Tier("target", target, FullCache(target, 260))], 0.0, 1.0, prefill_chunk=64)
        assert ar.generate(prompt, 40) == outs[0]


def test_graph_path_over_offloaded_store(models):
    """The retrieval tier's graph steps read an offloaded store's host layers from its device mirror
    (selected KV + tail); every tier must make the same drafts and verdicts as eager over FullCache."""
    target, tiny = models
    prompt = torch.randint(0, 64, (150,), generator=torch.Generator().manual_seed(5))
    ref = SpeculativeEngine(pipeline(target, tiny, 260, False), 0.0, 1.0, prefill_chunk=64)
    off = SpeculativeEngine(pipeline(target, tiny, 260, True, offloaded=True), 0.0, 1.0, prefill_chunk=64)
    want = ref.generate(prompt, 40)
    assert off.generate(prompt, 40) == want
    for name in ("target", "retrieval"):
        a, b = ref.stats(40)[name], off.stats(40)[name]
        assert (a["proposed"], a["accepted"]) == (b["proposed"], b["accepted"]), name
    assert off.tiers[1].graphed.cache.selections == 1 and off.tiers[0].cache.tail_start is not None
    assert off.generate(prompt, 40) == want  # a second call reuses the mirror


@torch.inference_mode()
def test_graph_mode_logits_per_cache(models):
    target, _ = models
    ids = torch.randint(0, 64, (1, 120), generator=torch.Generator().manual_seed(2)).to(DEVICE)

    def run(make, graphed):
        cache = make()
        target(ids[:, :100], cache)
        step = GraphedModel(target, cache, {1, 4}, capture=False) if graphed else None
        out = []
        for s in range(100, 116, 4):
            x = ids[:, s:s + 4]
            out.append(step(x, 4) if step else target(x, cache, last=4))
        return torch.cat([o.clone() for o in out], 1)

    for make in (lambda: FullCache(target, 128),
                 lambda: StreamingCache(target, 2, 10, slack=8, max_forward=128),
                 lambda: StreamingCache(target, 2, 10, slack=8, max_forward=128, position_shift=False)):
        assert torch.allclose(run(make, False), run(make, True), atol=1e-4)


CAPTURE_ERRORS = [RuntimeError("Triton Error [CUDA]: operation failed due to a previous error during capture"),
                  torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"),
                  RuntimeError("CUDA error: operation would make the legacy stream depend on a capturing blocking "
                               "stream (cudaErrorStreamCaptureInvalidated)")]


def capture_warnings(record) -> list:
    return [w for w in record if "CUDA-graph capture" in str(w.message)]


def test_failed_capture_runs_that_shape_eagerly(models, monkeypatch):
    """A capture that raises (as a real one does on OOM in the pool, an invalidated capture or a
    Triton launch error) leaves that step shape to the eager graph-mode code: the same tokens as a
    run without graphs, one warning, and no second capture attempt of a shape that failed."""
    target, _ = models
    prompt = torch.randint(0, 64, (40,), generator=torch.Generator().manual_seed(7))

    def tiers(graphs: bool):
        full = FullCache(target, 100)
        t = [Tier("target", target, full, gamma=3), Tier("retrieval", target, RetrievalCache(full, target, 16, 4))]
        if graphs:
            t[0].graphed = GraphedModel(target, full, graph_sizes(t, 0), capture=True)
            t[1].graphed = GraphedModel(target, t[1].cache, graph_sizes(t, 1), capture=CAPTURE)
        return t

    want = SpeculativeEngine(tiers(False), 1.0, 1.0, prefill_chunk=32).generate(prompt, 16, seed=4)
    eng = SpeculativeEngine(tiers(True), 1.0, 1.0, prefill_chunk=32)
    graphed = eng.tiers[0].graphed
    calls = []

    def failing_capture(n_new, last, head):
        calls.append((n_new, last))
        raise CAPTURE_ERRORS[(len(calls) - 1) % len(CAPTURE_ERRORS)]

    monkeypatch.setattr(graphed, "_capture", failing_capture)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert eng.generate(prompt, 16, seed=4) == want
        assert calls and len(set(calls)) == len(calls)  # each failed shape was tried once
        assert eng.generate(prompt, 16, seed=4) == want
    assert len(calls) == len(graphed.failed)  # ... and never again, in this call or the next
    assert not graphed.graphs
    assert len(capture_warnings(record)) == 1
    assert "Triton Error" in str(capture_warnings(record)[0].message)


@pytest.mark.skipif(not CAPTURE, reason="a real capture failure needs a CUDA GPU")
@pytest.mark.parametrize("failure", ["sync", "oom"])
def test_real_capture_failure_on_gpu(models, monkeypatch, failure):
    """A forbidden call inside the captured region (a device sync invalidates the capture; an
    allocation the pool cannot serve raises OOM mid-capture): every tier falls back, output as
    eager, one warning per tier, and later captures on the same device still work."""
    target, tiny = models
    prompt = torch.randint(0, 64, (150,), generator=torch.Generator().manual_seed(1))
    want = SpeculativeEngine(pipeline(target, tiny, 260, False), 1.0, 1.0, prefill_chunk=64).generate(prompt, 40, seed=3)
    calls = []
    real_capture = GraphedModel._capture

    def counted(self, n_new, last, head):
        calls.append((id(self), n_new, last, self.cache.graph_key()))
        return real_capture(self, n_new, last, head)

    def forbidden(module, inputs, output):
        if torch.cuda.is_current_stream_capturing():
            if failure == "sync":
                torch.cuda.synchronize()
            else:
                torch.empty(1 << 50, dtype=torch.uint8, device="cuda")

    monkeypatch.setattr(GraphedModel, "_capture", counted)
    handle = target.layers[0].register_forward_hook(forbidden)  # shared by all three tiers
    try:
        eng = SpeculativeEngine(pipeline(target, tiny, 260, True), 1.0, 1.0, prefill_chunk=64)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            assert eng.generate(prompt, 40, seed=3) == want
            assert eng.generate(prompt, 40, seed=3) == want
    finally:
        handle.remove()
    assert calls and len(set(calls)) == len(calls)
    assert all(not t.graphed.graphs and t.graphed.failed for t in eng.tiers)
    assert len(capture_warnings(record)) == 3
    assert not torch.cuda.is_current_stream_capturing()
    again = SpeculativeEngine(pipeline(target, tiny, 260, True), 1.0, 1.0, prefill_chunk=64)
    assert again.generate(prompt, 40, seed=3) == want
    assert all(t.graphed.graphs and not t.graphed.failed for t in again.tiers)


@pytest.mark.skipif(not CAPTURE, reason="needs a CUDA GPU to capture")
def test_capture_survives_garbage_collection(models):
    """Graphs of dead engines held by reference cycles are not destroyed inside a later capture
    (cudaGraphExecDestroy while capturing invalidates it), even when a collection runs there."""
    target, tiny = models
    prompt = torch.randint(0, 64, (150,), generator=torch.Generator().manual_seed(1))
    want = SpeculativeEngine(pipeline(target, tiny, 260, False), 1.0, 1.0, prefill_chunk=64).generate(prompt, 40, seed=3)
    for _ in range(2):  # dead engines in reference cycles, each holding its captured graphs
        dead = SpeculativeEngine(pipeline(target, tiny, 260, True), 1.0, 1.0, prefill_chunk=64)
        dead.generate(prompt, 8, seed=3)
        dead.me = dead
    del dead

    def collect(module, inputs, output):
        if torch.cuda.is_current_stream_capturing():
            gc.collect()

    handle = target.layers[0].register_forward_hook(collect)
    try:
        eng = SpeculativeEngine(pipeline(target, tiny, 260, True), 1.0, 1.0, prefill_chunk=64)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            assert eng.generate(prompt, 40, seed=3) == want
    finally:
        handle.remove()
    assert not capture_warnings(record)
    assert all(t.graphed.graphs and not t.graphed.failed for t in eng.tiers)


@pytest.mark.skipif(not CAPTURE or torch.cuda.get_device_capability()[0] < 9, reason="programmatic dependent launch: sm90+")
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_dependent_launch_changes_nothing(temperature):
    """Kernels launched with programmatic dependent launch read their weights before the previous
    kernel ends and everything else after it: a bf16 three-tier run under CUDA graphs (the fused
    projections, rope_write, split-K) gives the same tokens and accept counts with it on and off."""
    from triforce.kernels._common import set_pdl
    from triforce.models.llama import ModelArgs, build_model

    args = ModelArgs(vocab_size=512, dim=256, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=64, intermediate_size=704,
                     max_position_embeddings=2048, attention_bias=True)
    target = build_model(args, None, "cuda", torch.bfloat16, seed=4).eval()
    with torch.no_grad():
        target.lm_head.weight.mul_(8)
    prompt = torch.randint(0, 512, (300,), generator=torch.Generator().manual_seed(6))
    runs = []
    try:
        for on in (False, True):
            set_pdl(on)
            eng = SpeculativeEngine(pipeline(target, target.layer_subset([0]), 420, True), temperature, 1.0,
                                    prefill_chunk=64)
            runs.append((eng.generate(prompt, 64, seed=9), [(t.stats.proposed, t.stats.accepted) for t in eng.tiers]))
    finally:
        set_pdl(True)
    assert runs[0] == runs[1]
