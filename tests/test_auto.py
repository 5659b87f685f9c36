"""Adaptive speculation (triforce/auto.py): config validation, the cost table on disk, greedy
equality with autoregressive while the chooser switches, falling back to autoregressive (from
measured costs on SmolLM2, and mid-run from observed acceptance)."""
import json
from pathlib import Path

import pytest
import torch

import triforce
from triforce import auto
from triforce.cache import FullCache, StreamingCache
from triforce.engine import SpeculativeEngine, Tier
from triforce.models.llama import ModelArgs, build_model

CORPUS = Path(__file__).resolve().parents[1] / "data" / "corpus"
TINY = ["+model=tiny-random", "stream=false", "pipeline=auto", "gamma=auto", "draft.gamma=auto", "cache.budget=auto"]
PROSE = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
         "foolishness, it was the epoch of belief, it was the epoch of incredulity. ") * 40


def fake_costs(monkeypatch, target=10.0, middle=8.0, draft=2.0, per_token=0.1) -> None:
    """Fixed step costs (ms) for Chooser.ms that make speculation pay at the prior. The host time
    per forward is not observed against them (this machine's steps are not those costs)."""
    base = {"target": target, "middle": middle, "draft": draft}
    monkeypatch.setattr(auto.Chooser, "ms", lambda self, role, t: base[role] + per_token * t)
    monkeypatch.setattr(auto.Chooser, "_observe_host", lambda self, engine: None)


@pytest.fixture
def cost_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TRIFORCE_CACHE", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("override,msg", [
    ("gamma=fast", "gamma must be auto or an integer >= 1"), ("draft.gamma=0", "draft.gamma must be auto"),
    ("cache.budget=2", "cache.budget must be auto or an integer >= 4"), ("cache.budget=true", "cache.budget"),
    ("pipeline=fastest", "pipeline must be one of"),
])
def test_bad_auto_values(override, msg):
    with pytest.raises(ValueError, match=msg):
        triforce.load(*TINY, override)


def test_explicit_values_build_no_chooser():
    gen = triforce.load("+model=tiny-random", "pipeline=triforce", "gamma=6", "draft.gamma=4", "cache.budget=32")
    assert not gen.auto.adaptive and gen.auto.depth == 12
    r = gen.generate("hello " * 20, max_new_tokens=8)
    assert "auto" not in r.stats and set(r.stats["tiers"]) == {"target", "retrieval", "tiny"}


def test_cost_table_is_written_then_read(cost_dir):
    prompt = "a prompt long enough for a retrieval budget " * 16  # 700 byte tokens: budget 256 fits
    first = triforce.load(*TINY).generate(prompt, max_new_tokens=8).stats["auto"]
    table = json.loads((cost_dir / "step_costs.json").read_text())
    assert first["measured_now"] and set(first["measured_now"]) <= set(table)
    assert any("FullCache@1024" in k for k in table) and any("RetrievalCache256/4" in k for k in table)
    assert first["measure_seconds"] > 0
    second = triforce.load(*TINY).generate(prompt, max_new_tokens=8).stats["auto"]  # a new process would do the same
    assert second["measured_now"] == [] and second["measure_seconds"] == 0
    for name, c in second["step_costs_ms"].items():
        assert c["ms"] == {t: round(ms, 4) for t, ms in sorted(table[c["key"]]["ms"].items(), key=lambda x: int(x[0]))}


def test_expected_tokens_and_interpolation():
    assert auto.expected_tokens(0.0, 5) == 1.0 and auto.expected_tokens(1.0, 5) == 6.0
    assert abs(auto.expected_tokens(0.5, 2) - 1.75) < 1e-12
    costs = {1: 10.0, 5: 14.0, 9: 30.0}
    assert auto.interpolate(costs, 1) == 10.0 and auto.interpolate(costs, 3) == 12.0
    assert auto.interpolate(costs, 13) == 46.0  # extrapolated along the last segment
    # a 1-token step measured at 23.8 ms beside 1.46 ms for 2 tokens (a busy CPU) is capped
    assert auto.monotone({1: 23.8, 2: 1.46, 3: 1.98, 5: 1.55, 9: 2.39}) == {1: 1.46, 2: 1.46, 3: 1.55, 5: 1.55, 9: 2.39}


def test_rate_is_one_target_rounds_tokens_over_its_cost(monkeypatch):
    """The predicted rate of a configuration is the expected tokens of one target round over that
    round's cost (the tiers below producing gamma tokens, then the verification), checked by hand;
    a round must not be charged again for the rounds needed to emit gamma tokens."""
    target, tiny = peaky_model(1), peaky_model(3)
    full = FullCache(target, 200)
    tiers = Tier("target", target, full), Tier("tiny", tiny, StreamingCache(tiny, 2, 8, slack=48, max_forward=64))
    costs = {"target": {1: 10.0, 9: 12.0, 17: 14.0}, "middle": {1: 3.0, 5: 4.0}, "draft": {1: 0.5}}
    monkeypatch.setattr(auto.Chooser, "ms", lambda self, role, t: auto.interpolate(costs[role], t))
    settings = auto.AutoSettings(tuple(auto.ROLES), (8, 16), (4,), (256,))
    chooser = auto.Chooser(settings, tiers[0], {256: tiers[0]}, tiers[1], "test", prompt_len=48, new_tokens=100)
    chooser.budget = 256
    a0, a1 = 0.9, 0.8
    chooser.pairs = {("target", "middle256"): auto.Pair(a0, 0, 0, 0), ("middle", "draft"): auto.Pair(a1, 0, 0, 0),
                     ("target", "draft"): auto.Pair(a1, 0, 0, 0)}
    e = auto.expected_tokens
    for g in (8, 16):
        draft = e(a1, g) / (g * 0.5 + auto.interpolate(costs["target"], g + 1))
        assert chooser.rate(auto.Config("draft", (g,))) == pytest.approx(draft)
        middle_rounds = g / e(a1, 4)  # retrieval rounds of 4 tiny drafts needed for g tokens
        tri = e(a0, g) / (middle_rounds * (4 * 0.5 + 4.0) + auto.interpolate(costs["target"], g + 1))
        assert chooser.rate(auto.Config("triforce", (g, 4))) == pytest.approx(tri)
    assert chooser.rate(auto.Config("autoregressive")) == pytest.approx(1 / 10.0)


def test_a_switch_that_brings_a_tier_in_must_save_more_than_its_catch_up(monkeypatch):
    """Between rounds the chooser switches to a faster configuration only when the time saved over
    the remaining tokens exceeds the catch-up of the tiers it adds (a bouncing chooser paid 3 s of
    catch-up in a 5 s run on the H200); a switch that adds no tier costs nothing."""
    from types import SimpleNamespace

    target, tiny = peaky_model(1), peaky_model(3)
    t_target = Tier("target", target, FullCache(target, 200))
    t_tiny = Tier("tiny", tiny, StreamingCache(tiny, 2, 8, slack=48, max_forward=64))
    settings = auto.AutoSettings(("autoregressive", "draft"), (4,), (1,), (256,))
    ms = {"target": lambda t: 10.0 + 0.1 * t, "draft": lambda t: 1.0 * t}
    monkeypatch.setattr(auto.Chooser, "ms", lambda self, role, t: ms[role](t))
    chooser = auto.Chooser(settings, t_target, {}, t_tiny, "test", prompt_len=48, new_tokens=100)
    used = []
    engine = SimpleNamespace(tiers=[t_target], lens=[60], emitted=0, catch_up_seconds=0.0,
                             use=lambda tiers, gammas: used.append([t.name for t in tiers]))
    chooser.config = auto.Config("autoregressive")
    chooser.segments.append(auto.Segment("autoregressive"))
    chooser._seg_start = (0, 0.0)
    monkeypatch.setattr(auto.Chooser, "_observe", lambda self, engine: True)
    # the draft has seen nothing of 59 tokens: a 59-token catch-up step, predicted 59 ms
    assert chooser.switch_cost(engine, auto.Config("draft", (4,))) == pytest.approx(59.0)
    saving = 100 / chooser.rate(auto.Config("autoregressive")) - 100 / chooser.rate(auto.Config("draft", (4,)))
    assert saving > 59.0  # so with 100 tokens left it switches
    chooser.rounds_since = auto.REDECIDE_ROUNDS
    chooser.between_rounds(engine)
    assert used == [["target", "tiny"]]
    chooser.config, engine.tiers = auto.Config("autoregressive"), [t_target]
    chooser.switch_in_ms["draft"] = saving + 1.0  # its last switch-in took longer than the saving
    chooser.rounds_since = auto.REDECIDE_ROUNDS
    chooser.between_rounds(engine)
    assert used == [["target", "tiny"]] and chooser.config.pipeline == "autoregressive"
    engine.emitted = 99  # one token left: no switch pays for any catch-up
    chooser.switch_in_ms.clear()
    chooser.rounds_since = auto.REDECIDE_ROUNDS
    chooser.between_rounds(engine)
    assert chooser.config.pipeline == "autoregressive"


def test_switching_a_retrieval_tier_in_is_predicted_to_cost_no_step(monkeypatch):
    """A retrieval tier reads what it missed from the target's store, so however many tokens it
    missed, switching it in costs no catch-up step."""
    from types import SimpleNamespace

    from triforce.cache import RetrievalCache

    target = peaky_model(1)
    full = FullCache(target, 200)
    t_target, t_mid = Tier("target", target, full), Tier("retrieval", target, RetrievalCache(full, target, 16, 4))
    settings = auto.AutoSettings(("autoregressive", "retrieval"), (4,), (1,), (16,))
    monkeypatch.setattr(auto.Chooser, "ms", lambda self, role, t: {"target": 10.0, "middle": 2.0 + t}[role])
    chooser = auto.Chooser(settings, t_target, {16: t_mid}, None, "test", prompt_len=48, new_tokens=100)
    chooser.budget = 16
    engine = SimpleNamespace(tiers=[t_target], lens=[60])
    t_mid.cache.length = 20  # 39 tokens behind
    assert chooser.switch_cost(engine, auto.Config("retrieval", (4,))) == 0.0


def test_a_switch_counts_the_graph_captures_its_steps_lack(monkeypatch):
    """A configuration whose step sizes have no CUDA graph yet pays their captures first: before any
    capture, the warm-ups plus one step per missing graph; after some, their mean time. Both the
    first choice and a switch weigh them against the time saved over the tokens asked."""
    from types import SimpleNamespace

    target, tiny = peaky_model(1), peaky_model(3)
    t_target = Tier("target", target, FullCache(target, 200))
    t_tiny = Tier("tiny", tiny, StreamingCache(tiny, 2, 8, slack=48, max_forward=64))
    settings = auto.AutoSettings(("autoregressive", "draft"), (4, 8), (1,), (256,))
    monkeypatch.setattr(auto.Chooser, "ms", lambda self, role, t: {"target": 10.0, "draft": 1.0}[role])
    chooser = auto.Chooser(settings, t_target, {}, t_tiny, "test", prompt_len=48, new_tokens=100)

    def graphed(sizes, have):
        return SimpleNamespace(capture=True, sizes=sizes, tried_sizes=set(have), captures=0, capture_seconds=0.0,
                               warmup=2)
    t_target.graphed, t_tiny.graphed = graphed({1, 5, 6, 9, 10}, {1, 5}), graphed({1, 2, 3}, {1})
    assert chooser.capture_ms(auto.Config("draft", (4,))) == 0.0  # both steps captured
    assert chooser.capture_ms(auto.Config("draft", (8,))) == pytest.approx(3 * 10.0)  # target's 9: 2 warm-ups + 1
    t_target.graphed.captures, t_target.graphed.capture_seconds = 2, 0.5
    assert chooser.capture_ms(auto.Config("draft", (8,))) == pytest.approx(250.0)
    engine = SimpleNamespace(tiers=[t_target, t_tiny], lens=[60])
    assert chooser.switch_cost(engine, auto.Config("draft", (8,))) == pytest.approx(250.0)  # no tier added
    # from autoregressive with 100 tokens left at acceptance 0.9: gamma 8 is the fastest, but gamma 4,
    # whose graphs exist, saves more net of the switch
    used = []
    engine = SimpleNamespace(tiers=[t_target], lens=[60], emitted=0, catch_up_seconds=0.0,
                             use=lambda tiers, gammas: used.append(gammas))
    monkeypatch.setattr(auto.Chooser, "_observe", lambda self, engine: True)
    chooser.pairs = {("target", "draft"): auto.Pair(0.9, 0, 0, 0)}
    chooser.config = auto.Config("autoregressive")
    chooser.segments.append(auto.Segment("autoregressive"))
    chooser._seg_start = (0, 0.0)
    t_tiny.cache.length = 59  # caught up: the draft adds no catch-up
    d4, d8 = auto.Config("draft", (4,)), auto.Config("draft", (8,))
    assert chooser.rate(d8) > chooser.rate(d4)
    chooser.rounds_since = auto.REDECIDE_ROUNDS
    chooser.between_rounds(engine)
    assert used == [[4]] and chooser.config == d4
    # the first choice weighs the captures too: the least predicted time for the 100 tokens asked
    fresh = auto.Chooser(settings, t_target, {}, t_tiny, "test", prompt_len=48, new_tokens=100)
    fresh.pairs = {("target", "draft"): auto.Pair(0.9, 0, 0, 0)}
    monkeypatch.setattr(auto.Chooser, "_measure", lambda self, engine, tier, role, sizes=None: None)
    monkeypatch.setattr(auto.Chooser, "_may_pay", lambda self, engine, roles: True)
    used.clear()
    engine.bring_up_now = lambda tier: None
    fresh.start(engine)
    assert used == [[4]] and fresh.config == d4
    t_target.graphed.tried_sizes.add(9)  # gamma 8's verify captured as well: the faster one wins
    fresh2 = auto.Chooser(settings, t_target, {}, t_tiny, "test", prompt_len=48, new_tokens=100)
    fresh2.pairs = dict(fresh.pairs)
    fresh2.start(engine)
    assert fresh2.config == d8


def test_host_time_per_forward_is_observed_and_charged_to_every_step(monkeypatch):
    """Wall time beyond the steps' measured costs, over the forwards run, is charged to every step
    of every configuration: with 2 ms of host work per forward a 1 ms draft step no longer pays."""
    import time
    from types import SimpleNamespace

    target, tiny = peaky_model(1), peaky_model(3)
    t_target = Tier("target", target, FullCache(target, 200))
    t_tiny = Tier("tiny", tiny, StreamingCache(tiny, 2, 8, slack=48, max_forward=64))
    settings = auto.AutoSettings(("autoregressive", "draft"), (4,), (1,), (256,))
    monkeypatch.setattr(auto.Chooser, "ms", lambda self, role, t: {"target": 10.0, "draft": 1.0}[role])
    chooser = auto.Chooser(settings, t_target, {}, t_tiny, "test", prompt_len=48, new_tokens=100)
    chooser.pairs = {("target", "draft"): auto.Pair(0.5, 0, 0, 0)}
    draft, ar = auto.Config("draft", (4,)), auto.Config("autoregressive")
    assert chooser.host_ms == 0.0 and chooser.rate(draft) > chooser.rate(ar)
    chooser.config = draft
    engine = SimpleNamespace()
    chooser._observe_host(engine)  # the mark
    # the generation's first stretch does once-per-prompt work (a selection, first replays): left out
    t0, before, config, captures = chooser._mark
    chooser._mark = (t0 - 0.5, before, config, captures)
    t_target.stats.forwards += 1
    chooser._observe_host(engine)
    assert chooser.host_ms == 0.0 and chooser.host_forwards == 0
    t0, before, config, captures = chooser._mark
    # 3 rounds: 3 target verifications (10 ms) and 12 draft steps (1 ms) in 42 + 2 x 15 ms of wall
    chooser._mark = (t0 - (42 + 30) / 1e3, before, config, captures)
    t_target.stats.forwards += 3
    t_tiny.stats.forwards += 12
    chooser._observe_host(engine)
    assert chooser.host_ms == pytest.approx(2.0, abs=0.05)
    # a stretch with a CUDA-graph capture in it (a second spent) is one-off: not folded in
    t0, before, config, captures = chooser._mark
    chooser._mark = (t0 - 1.0, before, config, captures)
    t_tiny.graphed = SimpleNamespace(captures=1, capture_seconds=0.5)
    t_tiny.stats.forwards += 12
    chooser._observe_host(engine)
    assert chooser.host_ms == pytest.approx(2.0, abs=0.05) and chooser._mark[3] == 1
    e = auto.expected_tokens(0.5, 4)
    assert chooser.rate(draft) == pytest.approx(e / (4 * (1.0 + chooser.host_ms) + 10.0 + chooser.host_ms))
    assert chooser.rate(ar) == pytest.approx(1 / (10.0 + chooser.host_ms))
    assert chooser.rate(draft) < chooser.rate(ar)


def test_greedy_auto_equals_autoregressive_tiny(cost_dir, monkeypatch):
    """The real chooser, made to speculate (fake costs) so it switches as acceptance comes in."""
    ar = triforce.load("+model=tiny-random", "pipeline=autoregressive", "temperature=0")
    want = ar.generate(PROSE[:600], max_new_tokens=48).token_ids
    fake_costs(monkeypatch)
    monkeypatch.setattr(auto.Chooser, "_measure", lambda self, engine, tier, role, sizes=None: None)
    gen = triforce.load(*TINY, "temperature=0")
    r = gen.generate(PROSE[:600], max_new_tokens=48)
    assert r.token_ids == want
    a = r.stats["auto"]
    assert a["choice"] != "autoregressive" and a["budget"] == 256
    assert sum(c["tokens"] for c in a["configs"].values()) == 48


def test_greedy_auto_batch_rows_equal_autoregressive_tiny(cost_dir, monkeypatch):
    """Several prompts under pipeline=auto decode as one batch: the step costs are measured on the
    batch's own caches (entries per row count), one choice serves every row, and each greedy row
    equals its autoregressive run."""
    texts = [PROSE[:700], PROSE[100:720], PROSE[50:800]]  # every prompt over twice the 256 budget
    # float32: in bf16 on the GPU a batch's GEMMs round unlike one row's GEMVs, and a random model's
    # greedy rows part at near-ties (seen on the H200: row 2 at token 14 of 40)
    ar = triforce.load("+model=tiny-random", "pipeline=autoregressive", "temperature=0", "dtype=float32")
    want = [ar.generate(t, max_new_tokens=40).token_ids for t in texts]
    fake_costs(monkeypatch)  # speculation pays; the real costs are still measured
    rows = triforce.load(*TINY, "temperature=0", "dtype=float32").generate(texts, max_new_tokens=40)
    assert [r.token_ids for r in rows] == want
    a = rows[0].stats["auto"]
    assert rows[0].stats["batch"]["rows"] == 3 and a["choice"] != "autoregressive" and a["budget"] == 256
    table = json.loads((cost_dir / "step_costs.json").read_text())
    batched = [k for k in table if k.endswith("|rows=3")]
    for kind in ("FullCache@1024", "RetrievalCache256/4", "StreamingCache"):
        assert any(f"|{kind}" in k for k in batched), (kind, batched)


def test_a_draft_expected_to_run_is_prefilled_before_decoding(cost_dir, monkeypatch):
    """A draft the chooser expects to use is prefilled with the prompt (counted as prefill), so no
    catch-up of the prompt lands in the decode; a second call with the same seed repeats the first."""
    fake_costs(monkeypatch)
    monkeypatch.setattr(auto.Chooser, "_measure", lambda self, engine, tier, role, sizes=None: None)
    gen = triforce.load(*TINY, "temperature=0.6", "cache.budget=1024")  # budget over half the prompt: no middle tier
    first = gen.generate(PROSE[:600], max_new_tokens=32, seed=3)
    a = first.stats["auto"]
    assert a["choice"].startswith("draft") and a["catch_up_tokens"] == 0
    assert gen.generate(PROSE[:600], max_new_tokens=32, seed=3).token_ids == first.token_ids


def peaky_model(seed: int):
    """A small random model with sharp logits: two seeds disagree, so drafts are mostly rejected."""
    args = ModelArgs(vocab_size=12, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64,
                     max_position_embeddings=256)
    model = build_model(args, None, "cpu", torch.float32, seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(60.0)
    return model.eval()


def test_stops_speculating_when_acceptance_makes_it_lose(monkeypatch):
    """Fake costs make speculation pay at the prior acceptance; the draft (another random model)
    is rarely accepted, so after a few rounds the chooser switches to autoregressive."""
    target, tiny = peaky_model(1), peaky_model(3)
    full = FullCache(target, 200)
    t_target, t_tiny = Tier("target", target, full), Tier("tiny", tiny, StreamingCache(tiny, 2, 8, slack=48, max_forward=64))
    settings = auto.AutoSettings(("autoregressive", "draft"), (1, 2, 4), (1,), (256,))
    fake_costs(monkeypatch, target=10.0, draft=4.0, per_token=0.0)
    monkeypatch.setattr(auto.Chooser, "_measure", lambda self, engine, tier, role, sizes=None: None)
    chooser = auto.Chooser(settings, t_target, {}, t_tiny, "test", prompt_len=48, new_tokens=100)
    eng = SpeculativeEngine([t_target, t_tiny], 1.0, 1.0, prefill_chunk=64, chooser=chooser)
    prompt = torch.randint(0, 12, (48,), generator=torch.Generator().manual_seed(0))
    eng.generate(prompt, 100, seed=0)
    seq = [c for c, _ in chooser.report(eng, 100, 1.0)["sequence"]]
    assert seq[0].startswith("draft") and seq[-1] == "autoregressive", (seq, chooser.pairs)
    assert chooser.pairs[("target", "draft")].estimate < 0.5


@pytest.fixture(scope="module")
def smollm2_gens():
    common = ["dtype=float32", "temperature=0", "stream=false", "chat=false"]
    return triforce.load("pipeline=autoregressive", *common), triforce.load("pipeline=auto", *common)


def botchan_ids(gen, n):
    path = CORPUS / "botchan.txt"
    text = path.read_text() if path.exists() else PROSE * 4
    return gen.encode(text, chat=False)[20000 % max(1, len(text) // 8):][:n]


def test_cpu_falls_back_to_autoregressive_on_smollm2(smollm2_gens, cost_dir):
    """Every tier of the embedded SmolLM2 runs the same 135M weights; on a CPU a step is bound by
    them, not by the KV, so the measured costs say no speculation pays: auto must run AR."""
    ar, gen = smollm2_gens
    if torch.cuda.is_available():
        pytest.skip("checks the CPU decision")
    ids = botchan_ids(ar, 600)
    r = gen.generate(ids, max_new_tokens=8)
    a = r.stats["auto"]
    assert a["measured_now"] and a["choice"] == "autoregressive" and a["switches"] == 0, a["why"]
    assert a["why"].startswith("best speculative"), a["why"]
    assert r.token_ids == ar.generate(ids, max_new_tokens=8).token_ids


def test_greedy_auto_equals_autoregressive_smollm2(smollm2_gens, cost_dir, monkeypatch):
    ar, gen = smollm2_gens
    fake_costs(monkeypatch, target=10.0, middle=3.0, draft=1.0)
    monkeypatch.setattr(auto.Chooser, "_measure", lambda self, engine, tier, role, sizes=None: None)
    ids = botchan_ids(ar, 700)
    r = gen.generate(ids, max_new_tokens=32)
    assert r.token_ids == ar.generate(ids, max_new_tokens=32).token_ids
    assert r.stats["auto"]["choice"] != "autoregressive"


def test_a_pair_left_after_a_few_rounds_counts_at_its_optimistic_estimate(monkeypatch):
    """A pipeline left after a few unlucky rounds gets another look: a pair the running configuration
    does not judge, but judged before, counts at its estimate plus one standard deviation; the
    running configuration's pairs and never-judged ones count at their estimates (a prior)."""
    target, tiny = peaky_model(1), peaky_model(3)
    t_target = Tier("target", target, FullCache(target, 200))
    t_tiny = Tier("tiny", tiny, StreamingCache(tiny, 2, 8, slack=48, max_forward=64))
    costs = {"target": {1: 10.0, 17: 12.0}, "middle": {1: 2.0, 9: 2.5}, "draft": {1: 0.5}}
    monkeypatch.setattr(auto.Chooser, "ms", lambda self, role, t: auto.interpolate(costs[role], t))
    settings = auto.AutoSettings(tuple(auto.ROLES), (4, 8, 16), (4,), (256,))
    chooser = auto.Chooser(settings, t_target, {256: t_target}, t_tiny, "test", prompt_len=48, new_tokens=100)
    chooser.budget = 256
    left = auto.Pair(0.95, 12, 9, 3)  # three rounds of 12 tokens landed on hard positions
    chooser.pairs = {("target", "middle256"): left, ("middle", "draft"): auto.Pair(0.8, 40, 30, 5),
                     ("target", "draft"): auto.Pair(0.7, 40, 20, 8)}
    sd = (left.estimate * (1 - left.estimate) / 22) ** 0.5
    assert left.optimistic == pytest.approx(left.estimate + sd)
    tri = auto.Config("triforce", (16, 4))
    chooser.config = tri  # running: its own pairs at their estimates
    assert chooser.acceptance("target", "middle") == left.estimate
    at_estimate = chooser.rate(tri)
    chooser.config = auto.Config("draft", (4,))  # left for the tiny draft: the retrieval pair is not judged now
    assert chooser.acceptance("target", "middle") == left.optimistic
    assert chooser.acceptance("target", "draft") == chooser.pairs["target", "draft"].estimate
    assert chooser.rate(tri) > at_estimate
    fresh = auto.Pair(0.95)
    chooser.pairs["target", "middle256"] = fresh  # never judged: its prior, no optimism on top
    assert chooser.acceptance("target", "middle") == fresh.estimate == 0.95
    judged = auto.Pair(0.95, 1200, 900, 300)  # many rounds: the optimism has shrunk to ~0.01
    assert judged.optimistic - judged.estimate < 0.015
