"""Batched speculation: B sequences share every tier's forwards, each row stays its own run.

Each row of a batch must equal the single-sequence run of its prompt with its seed (greedy and
sampled: a batch row draws exactly what its single run draws), through the eager path and the
CUDA-graph path (device lengths, the batched split-K kernel; uncaptured on CPU, Triton
interpreted), for rows of very different lengths, a row whose EOS arrives inside a draft, and
every pipeline. Losslessness per row is tested statistically, 3 prompts in one batch, with fixed
tiers and with a chooser switching them for the whole batch every round.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest

import triforce.engine as engine_mod
from test_lossless import CYCLE_SPEC_FIRST, Alternating, V, broken_verify, peaky_model, tv_bound
from triforce.cache import FullCache, RetrievalCache, Rows, StreamingCache
from triforce.engine import SpeculativeEngine, Tier
from triforce.graphs import GraphedModel, graph_sizes
from triforce.sampling import process_logits

CAPTURE = torch.cuda.is_available()
DEVICE = "cuda" if CAPTURE else "cpu"
LENGTHS = (150, 7, 1, 96)  # very different prompt lengths, one of a single token


def tiers(target, tiny, pipeline, batch, n=260, graphs=False):
    full = Rows.build(lambda b: FullCache(target, n), batch)
    out = [Tier("target", target, full, gamma=4)]
    if pipeline in ("retrieval", "triforce"):
        out.append(Tier("retrieval", target, Rows.build(lambda b: RetrievalCache(full.rows[b], target, 32, 4), batch),
                        gamma=3))
    if pipeline == "triforce":
        out.append(Tier("tiny", tiny, Rows.build(lambda b: StreamingCache(tiny, 2, 12, slack=16, max_forward=64), batch)))
    if pipeline == "draft":
        out.append(Tier("tiny", tiny, Rows.build(lambda b: FullCache(tiny, n), batch)))
    if graphs:
        for level, t in enumerate(out):
            t.graphed = GraphedModel(t.model, t.cache, graph_sizes(out, level), capture=CAPTURE)
    return out


def prompts(lengths=LENGTHS, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (n,), generator=g) for n in lengths]


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph_path"])
@pytest.mark.parametrize("pipeline", ["autoregressive", "retrieval", "draft", "triforce"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_batch_rows_equal_single_runs(models, pipeline, temperature, graphs):
    target, tiny = models
    ps = prompts()
    maxes = [24, 5, 17, 24]  # rows finish at different rounds
    eng = SpeculativeEngine(tiers(target, tiny, pipeline, len(ps), graphs=graphs), temperature, 1.0, prefill_chunk=64)
    rows = eng.generate_batch(ps, maxes, seeds=[3, 4, 5, 6])
    assert [len(r) for r in rows] == maxes
    if temperature > 0 and CAPTURE:
        return  # on the GPU a batch's GEMMs round unlike one row's GEMVs: a sampled row may part at a near-tie
    for b, p in enumerate(ps):
        one = SpeculativeEngine(tiers(target, tiny, pipeline, 1), temperature, 1.0, prefill_chunk=64)
        assert rows[b] == one.generate(p, maxes[b], seed=3 + b), f"row {b} differs from its single run"
    if pipeline != "autoregressive":
        st = eng.tiers[0].stats
        assert 0 < st.accepted < st.proposed and sum(st.row_proposed) == st.proposed


@pytest.mark.parametrize("pipeline,temperature,graphs", [
    ("autoregressive", 0.0, False), ("autoregressive", 1.0, False), ("triforce", 0.0, False), ("triforce", 1.0, False),
    ("triforce", 1.0, True)])
def test_waiting_prompts_take_finished_rows(models, pipeline, temperature, graphs):
    """Five prompts over two rows: each later prompt takes the row of one that finished (its caches
    reset and brought up, its stream seeded afresh), and every prompt equals its single run."""
    target, tiny = models
    ps = prompts((150, 7, 1, 96, 40), seed=3)
    maxes = [5, 30, 12, 9, 20]
    seeds = [10 + i for i in range(len(ps))]
    eng = SpeculativeEngine(tiers(target, tiny, pipeline, 2, graphs=graphs), temperature, 1.0, prefill_chunk=64)
    got = eng.generate_batch(ps, maxes, seeds=seeds, rows=2)
    assert [len(r) for r in got] == maxes and eng.refill_seconds > 0
    assert sorted(eng.admit_seconds)[:2] == [0.0, 0.0] and all(a > 0 for a in sorted(eng.admit_seconds)[2:])
    if pipeline != "autoregressive":
        st = eng.tiers[0].stats
        assert len(st.row_proposed) == len(ps) and sum(st.row_proposed) == st.proposed
    if temperature > 0 and CAPTURE:
        return  # a sampled row may part from its single run at a near-tie on the GPU
    for i, p in enumerate(ps):
        one = SpeculativeEngine(tiers(target, tiny, pipeline, 1), temperature, 1.0, prefill_chunk=64)
        assert got[i] == one.generate(p, maxes[i], seed=seeds[i]), f"prompt {i} differs from its single run"


def test_eos_inside_a_draft_stops_only_that_row(models):
    target, tiny = models
    ps = prompts((40, 60, 25), seed=7)
    free = SpeculativeEngine(tiers(target, tiny, "triforce", 3), 0.0, 1.0).generate_batch(ps, 20)
    stop = free[1][6]  # row 1's 7th token: with gamma 4 it arrives inside a draft
    first = free[1].index(stop)
    eng = SpeculativeEngine(tiers(target, tiny, "triforce", 3), 0.0, 1.0)
    rows = eng.generate_batch(ps, 20, stop_ids={stop})
    assert rows[1] == free[1][:first + 1]
    for b in (0, 2):
        want = free[b][:free[b].index(stop) + 1] if stop in free[b] else free[b]
        assert rows[b] == want


def test_bad_batches_are_refused(models):
    target, tiny = models
    eng = SpeculativeEngine(tiers(target, tiny, "retrieval", 2), 0.0, 1.0)
    with pytest.raises(ValueError, match="at least one prompt"):
        eng.generate_batch([], 4)
    with pytest.raises(ValueError, match="caches for 2 rows, the batch has 3"):
        eng.generate_batch(prompts((5, 6, 7)), 4)
    with pytest.raises(ValueError, match=r"rows must be in 1..3"):
        eng.generate_batch(prompts((5, 6, 7)), 4, rows=4)
    with pytest.raises(ValueError, match="3 prompts need 3"):
        SpeculativeEngine(tiers(target, tiny, "retrieval", 3), 0.0, 1.0).generate_batch(prompts((5, 6, 7)), [4, 4])


# ------------------------------------------------------------------ statistical losslessness per row
N = 1500


class EveryRound(Alternating):
    """`Alternating` for a batch: the next configuration of the cycle before every target round."""

    def start(self, engine):
        super().start(engine)
        self.started = False

    def between_rounds(self, engine):
        if self.started:  # the first round was configured by start()
            self._next(engine)
        self.started = True


def batch_joints(target, tiny, ps, cycle=None):
    """Empirical joints of each row's first two tokens over N batched runs (triforce, 3 tiers; with
    `cycle`, a chooser switching tiers and gammas for the whole batch every target round)."""
    n = max(p.numel() for p in ps) + 32
    full = Rows.build(lambda b: FullCache(target, n), len(ps))
    tl = [Tier("target", target, full, gamma=3),
          Tier("retrieval", target, Rows.build(lambda b: RetrievalCache(full.rows[b], target, 8, 4), len(ps)), gamma=2),
          Tier("tiny", tiny, Rows.build(lambda b: StreamingCache(tiny, 2, 4, max_forward=64), len(ps)))]
    eng = SpeculativeEngine(tl, 1.0, 1.0, prefill_chunk=64, chooser=EveryRound(tl, cycle) if cycle else None)
    counts = torch.zeros(len(ps), V, V)
    for seed in range(N):
        for b, (x1, x2) in enumerate(eng.generate_batch(ps, 2, seeds=[seed * 7 + b for b in range(len(ps))])):
            counts[b, x1, x2] += 1
    return counts / N


@pytest.fixture(scope="module")
def peaky():
    return peaky_model(1), peaky_model(2), prompts((48, 20, 33), seed=0)


def _prompts_v(ps):
    return [p % V for p in ps]


@torch.inference_mode()
def exact_joint(target, prompt):
    """p(x1, x2) of the target after `prompt`, by enumeration over x1 (temperature 1)."""
    cache = FullCache(target, prompt.numel() + 2)
    p1 = process_logits(target(prompt[None], cache, last=1)[0], 1.0, 1.0)[0]
    joint = torch.zeros(V, V)
    for x1 in range(V):
        cache.truncate(prompt.numel())
        joint[x1] = p1[x1] * process_logits(target(torch.tensor([[x1]]), cache)[0], 1.0, 1.0)[0]
    return joint


def test_each_batch_row_is_distributed_as_the_target(peaky):
    target, tiny, ps = peaky
    ps = _prompts_v(ps)
    emp = batch_joints(target, tiny, ps)
    for b, p in enumerate(ps):
        truth = exact_joint(target, p)
        tv = 0.5 * float((emp[b] - truth).abs().sum())
        assert tv < tv_bound(truth, N), f"row {b}: TV {tv:.4f} exceeds the sampling bound {tv_bound(truth, N):.4f}"


def test_batch_rows_stay_exact_while_a_chooser_switches_configurations(peaky):
    """One choice serves the whole batch (pipeline=auto): rounds switch tiers and gammas for every
    row at once, from what earlier rounds of all rows showed, and each row stays the target's."""
    target, tiny, ps = peaky
    ps = _prompts_v(ps)
    emp = batch_joints(target, tiny, ps, cycle=CYCLE_SPEC_FIRST)
    for b, p in enumerate(ps):
        truth = exact_joint(target, p)
        tv = 0.5 * float((emp[b] - truth).abs().sum())
        assert tv < tv_bound(truth, N), f"row {b}: TV {tv:.4f} exceeds the sampling bound {tv_bound(truth, N):.4f}"


def test_broken_verifier_is_detected_in_a_batch(peaky, monkeypatch):
    target, tiny, ps = peaky
    ps = _prompts_v(ps)
    monkeypatch.setattr(engine_mod, "speculative_verify_rows", broken_verify)
    emp = batch_joints(target, tiny, ps)
    tvs = [(0.5 * float((emp[b] - exact_joint(target, p)).abs().sum()), tv_bound(exact_joint(target, p), N))
           for b, p in enumerate(ps)]
    assert any(tv > bound for tv, bound in tvs), f"a broken verifier went unnoticed: {tvs}"


@torch.inference_mode()
@pytest.mark.parametrize("lengths", [(150, 90, 60, 120), (150, 90, 20, 120)], ids=["batched", "row_by_row"])
def test_device_selection_equals_eager_selection(models, lengths):
    """The retrieval tier's one-off selection runs as an uncaptured graph-mode step: all rows'
    chunk scores and top-k in a few launches per layer (`device_choose`). It must pick what each
    row's eager `choose` picks, with rows of different lengths, and give the eager step's logits;
    where one row's budget covers its prefix the rows take the row-by-row graph-mode path."""
    target, _ = models
    ps = prompts(lengths, seed=7)
    n = 200

    def prefilled(batch_prompts):
        full = Rows.build(lambda b: FullCache(target, n), len(batch_prompts))
        ret = Rows.build(lambda b: RetrievalCache(full.rows[b], target, 32, 4), len(batch_prompts))
        for row, p in zip(full.rows, batch_prompts):
            target(p[None, :-1].to(DEVICE), row, last=0)
        for row, p in zip(ret.rows, batch_prompts):
            row.adopt_prefix(p.numel() - 1)
        return ret

    last = torch.stack([p[-1:] for p in ps]).to(DEVICE)  # each row's last prompt token, [B, 1]
    batched = prefilled(ps)
    got = GraphedModel(target, batched, {1}, capture=False)(last, 1)
    assert all(r.selections == 1 and not r.select_next for r in batched.rows)
    for b, p in enumerate(ps):
        single = prefilled([p])  # one row: the eager selecting step
        want = target(last[b:b + 1], single, last=1)
        torch.testing.assert_close(got[b:b + 1], want, atol=1e-4, rtol=1e-4)
        if not single.full_view:
            assert torch.equal(batched.rows[b].sel_idx, single.sel_idx), b
        assert batched.rows[b].full_view == single.full_view == (p.numel() - 1 <= 32)


def test_only_retrieval_scoring_selects_on_the_device(models):
    """A subclass that scores chunks its own way (Quest) must keep its eager selection."""
    from triforce.policies.quest import QuestPolicy

    target, _ = models
    full = FullCache(target, 64)
    assert RetrievalCache(full, target, 16, 4).can_select_in_graph_mode() == full.device_resident
    assert not QuestPolicy(full, target, 16, 4).can_select_in_graph_mode()
