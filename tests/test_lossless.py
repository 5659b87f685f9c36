"""Statistical losslessness: speculative pipelines sample exactly the target's distribution.

On a small random model (vocabulary 12, peaky logits) the first two generated tokens are drawn
N times per pipeline; their empirical joint distribution is compared with the exact target joint
(enumerated: p(x1) p(x2 | x1)) by total-variation distance. The bound is derived from N:
E[TV] <= 1/2 sum_x sqrt(p_x (1 - p_x) / N) (Jensen), plus sqrt(ln(1/delta) / 2N) by McDiarmid
(one sample moves TV by at most 1/N), delta = 1e-4. A verifier that resamples from p instead
of norm(max(0, p - q)) is rejected by the same check, so the test can fail.

Adaptive speculation (triforce/auto.py) may change the tier list and the gammas between target
rounds; `Alternating` forces a different configuration every round (switching tiers in and out,
so their caches catch up mid-run) and the same test must hold.
"""
import math

import pytest
import torch

import triforce.engine as engine_mod
from triforce.cache import FullCache, StreamingCache
from triforce.engine import SpeculativeEngine, Tier
from triforce.lookup import LookupCache, PromptLookup
from triforce.models.llama import ModelArgs, build_model
from triforce.models.quant import quantized_view
from triforce.policies import make_policy
from triforce.sampling import process_logits, sample

V, PROMPT, N = 12, 48, 2000


def peaky_model(seed: int):
    args = ModelArgs(vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64,
                     max_position_embeddings=256)
    model = build_model(args, None, "cpu", torch.float32, seed=seed)
    with torch.no_grad():  # random init gives near-uniform logits; sharpen them so tiers differ
        model.lm_head.weight.mul_(60.0)
        for layer in model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
    return model.eval()


@pytest.fixture(scope="module")
def setup():
    target, tiny = peaky_model(1), peaky_model(2)
    prompt = torch.randint(0, V, (PROMPT,), generator=torch.Generator().manual_seed(0))
    return target, tiny, prompt


def tiers(target, tiny, pipeline, policy="retrieval", middle_weights="bf16"):
    full = FullCache(target, PROMPT + 32)
    out = [Tier("target", target, full, gamma=3)]
    if pipeline in ("retrieval", "triforce", "triforce_lookup"):
        middle = quantized_view(target, middle_weights, group_size=32)  # the target itself for bf16
        out.append(Tier(policy, middle, make_policy(policy, full, target, 8, 4, "once"), gamma=2))
    if pipeline == "triforce":
        out.append(Tier("tiny", tiny, StreamingCache(tiny, 2, 4, max_forward=64)))
    if pipeline == "triforce_lookup":  # a deterministic (one-hot) bottom tier
        out.append(Tier("lookup", PromptLookup(V), LookupCache(PROMPT + 32, "cpu")))
    if pipeline == "draft":  # classic two-tier: the tiny draft over its own full KV, verified by the target
        out.append(Tier("tiny", tiny, FullCache(tiny, PROMPT + 32)))
    return out


@torch.inference_mode()
def exact_joint(target, prompt, temperature, top_p):
    """p(x1, x2) of the target by enumeration over x1."""
    cache = FullCache(target, PROMPT + 2)
    p1 = process_logits(target(prompt[None], cache, last=1)[0], temperature, top_p)[0]
    joint = torch.zeros(V, V)
    for x1 in range(V):
        cache.truncate(PROMPT)
        p2 = process_logits(target(torch.tensor([[x1]]), cache)[0], temperature, top_p)[0]
        joint[x1] = p1[x1] * p2
    return joint


@torch.inference_mode()
def first_token_dist(model, tier_list, prompt, temperature, top_p):
    """The bottom tier's exact distribution of the first token (to show the tiers differ)."""
    eng = SpeculativeEngine(tier_list, temperature, top_p, prefill_chunk=64)
    eng._start([prompt], PROMPT + 8, [0])
    for t in tier_list:
        t.cache.reset()
    eng._prefill()
    return eng._distributions(len(tier_list) - 1, 1)[0][0]


class Alternating:
    """A chooser that runs the next configuration of `cycle` every target round: (tier indices into
    the triforce tier list, gammas). Satisfies the interface the engine consults."""

    def __init__(self, tier_list, cycle):
        self.tiers, self.cycle, self.max_depth, self.measure_seconds = tier_list, cycle, 8, 0.0

    def _next(self, engine):
        idx, gammas = self.cycle[self.i % len(self.cycle)]
        self.i += 1
        engine.use([self.tiers[i] for i in idx], list(gammas))

    def start(self, engine):
        self.i = 0
        self._next(engine)

    def between_rounds(self, engine):
        if engine.seq_len > PROMPT:  # the first round was configured by start()
            self._next(engine)


# [target], [target, retrieval], [target, tiny] and [target, retrieval, tiny] with several gammas
CYCLE_SPEC_FIRST = [((0, 1, 2), (3, 2)), ((0,), ()), ((0, 2), (2,)), ((0, 1), (1,)), ((0, 1, 2), (2, 3))]
CYCLE_AR_FIRST = CYCLE_SPEC_FIRST[1:] + CYCLE_SPEC_FIRST[:1]


def empirical_joint(target, tiny, prompt, pipeline, temperature, top_p, policy="retrieval", middle_weights="bf16",
                    cycle=None):
    tier_list = tiers(target, tiny, pipeline, policy, middle_weights)
    chooser = Alternating(tier_list, cycle) if cycle else None
    eng = SpeculativeEngine(tier_list, temperature, top_p, prefill_chunk=64, chooser=chooser)
    counts = torch.zeros(V, V)
    for seed in range(N):
        x1, x2 = eng.generate(prompt, 2, seed=seed)
        counts[x1, x2] += 1
    return counts / N


def tv_bound(p: torch.Tensor, n: int, delta: float = 1e-4) -> float:
    return 0.5 * float((p * (1 - p) / n).sqrt().sum()) + math.sqrt(math.log(1 / delta) / (2 * n))


def tv_and_bound(emp: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    """TV distance of the empirical joint from the exact one, and the bound N samples allow."""
    return 0.5 * float((emp - truth).abs().sum()), tv_bound(truth, N)


def broken_verify(draft, q, p, streams, live=None):
    """Resamples from p (not the residual) on rejection: biased towards the draft."""
    b, g = draft.shape
    u = streams.uniform(g, live)
    qx, px = q.gather(2, draft[..., None])[..., 0], p[:, :g].gather(2, draft[..., None])[..., 0]
    n = (u * qx < px).cumprod(1).sum(1)
    return n, sample(p[torch.arange(b), n], uniform=streams.uniform(p.shape[-1], live))


CASES = [("retrieval", 1.0, 1.0, "retrieval", "bf16"), ("triforce", 1.0, 1.0, "retrieval", "bf16"),
         ("triforce", 1.0, 0.8, "retrieval", "bf16"), ("triforce", 1.0, 1.0, "streaming", "bf16"),
         ("retrieval", 1.0, 1.0, "h2o", "bf16"), ("triforce_lookup", 1.0, 0.8, "retrieval", "bf16"),
         ("draft", 1.0, 0.8, None, "bf16"),
         ("triforce", 1.0, 0.8, "retrieval", "int4")]  # an int4 middle tier: other weights, same output


@pytest.mark.parametrize("pipeline,temperature,top_p,policy,middle_weights", CASES)
def test_output_distribution_is_the_targets(setup, pipeline, temperature, top_p, policy, middle_weights):
    target, tiny, prompt = setup
    truth = exact_joint(target, prompt, temperature, top_p)
    # the drafts must really differ from the target, or the test could not fail
    t_first = truth.sum(1)
    d_first = first_token_dist(target, tiers(target, tiny, pipeline, policy, middle_weights), prompt, temperature, top_p)
    assert 0.5 * (t_first - d_first).abs().sum() > 0.05
    emp = empirical_joint(target, tiny, prompt, pipeline, temperature, top_p, policy, middle_weights)
    tv, bound = tv_and_bound(emp, truth)
    assert tv < bound, f"TV {tv:.4f} exceeds the sampling bound {bound:.4f}"


def test_broken_verifier_is_detected(setup, monkeypatch):
    target, tiny, prompt = setup
    monkeypatch.setattr(engine_mod, "speculative_verify_rows", broken_verify)
    truth = exact_joint(target, prompt, 1.0, 1.0)
    emp = empirical_joint(target, tiny, prompt, "triforce", 1.0, 1.0)
    tv, bound = tv_and_bound(emp, truth)
    assert tv > bound, f"a broken verifier went unnoticed: TV {tv:.4f} <= bound {bound:.4f}"


@pytest.mark.parametrize("cycle", [CYCLE_SPEC_FIRST, CYCLE_AR_FIRST], ids=["spec_first", "ar_first"])
def test_switching_configurations_between_rounds_is_lossless(setup, cycle):
    target, tiny, prompt = setup
    truth = exact_joint(target, prompt, 1.0, 1.0)
    emp = empirical_joint(target, tiny, prompt, "triforce", 1.0, 1.0, cycle=cycle)
    tv, bound = tv_and_bound(emp, truth)
    assert tv < bound, f"TV {tv:.4f} exceeds the sampling bound {bound:.4f}"


@torch.inference_mode()
def test_a_retrieval_tier_switched_back_in_catches_up_without_a_forward(setup):
    """A tier reading the target's KV catches up without a forward (every position it missed is one
    the target verified and holds) and keeps its selection; greedy output still equals the target's
    own greedy run."""
    target, tiny, prompt = setup
    ar = SpeculativeEngine(tiers(target, tiny, "autoregressive"), 0.0, 1.0, prefill_chunk=64)
    want = ar.generate(prompt, 24, seed=0)
    tier_list = tiers(target, tiny, "retrieval")
    eng = SpeculativeEngine(tier_list, 0.0, 1.0, prefill_chunk=64,
                            chooser=Alternating(tier_list, [((0, 1), (2,)), ((0,), ()), ((0,), ())]))
    assert eng.generate(prompt, 24, seed=0) == want
    assert eng.catch_up_tokens == 0 and tier_list[1].stats.forwards > 0 and tier_list[1].cache.selections == 1


def test_broken_verifier_is_detected_when_switching(setup, monkeypatch):
    target, tiny, prompt = setup
    monkeypatch.setattr(engine_mod, "speculative_verify_rows", broken_verify)
    truth = exact_joint(target, prompt, 1.0, 1.0)
    emp = empirical_joint(target, tiny, prompt, "triforce", 1.0, 1.0, cycle=CYCLE_SPEC_FIRST)
    tv, bound = tv_and_bound(emp, truth)
    assert tv > bound, f"a broken verifier went unnoticed: TV {tv:.4f} <= bound {bound:.4f}"
