"""Adaptive speculation: which tiers, gammas and retrieval budget to run, chosen from measured step
costs and observed acceptance (`pipeline=auto`, `gamma=auto`, `draft.gamma=auto`, `cache.budget=auto`).

Why: which configuration pays depends on the machine, the model sizes, the context and the text.
On an H200 three tiers win for a 7B at 128K while a 135M model is fastest with two tiers or none;
the best gamma moves from ~12 on-chip to 24-40 with an offloaded target; on a 2-core CPU every
pipeline of the embedded SmolLM2 is slower than plain decoding. No fixed default is right.

Cost model. Each tier's step cost (ms) by tokens fed (1 for a draft step, gamma + 1 for a
verification) is measured once per (device, model name + shape, dtype, CUDA graphs, cache kind and
budget, context bucket = the prompt length rounded up to a power of two) by timing a few real
steps on the caches right after the prefill (graph replays on GPU, eager on CPU), and kept in
`cache_dir()/step_costs.json`; sizes in between are interpolated linearly. The measurement is
reported apart from decode time.

Acceptance. For each (verifier, drafter) pair the per-token acceptance is estimated online as
accepted / (accepted + rejections), the running mean over the draft tokens the verifier actually
judged (drafts after the first rejection of a round are never judged, so accepted / proposed would
undercount the per-token rate), with a Beta-style prior: `PRIOR_WEIGHT` pseudo-tokens at the prior.
The prior is 0.7 for model drafts (the lower end of what the README measured for the retrieval
tier and the self-draft on prose, 0.62-0.97), so speculation starts only where it pays at an
ordinary acceptance; for the retrieval tier it rises with the budget (0.65 at 256 to 0.95 at
4096, fitted to the README's acceptance table and TriForce's ~0.9 at 4K), which is what picks
`cache.budget=auto`. Ten pseudo-tokens are about two rounds, so observations dominate quickly.
A pair that the running configuration does not judge but that was judged before counts at its
estimate plus one standard deviation (`Pair.optimistic`): a pipeline left after a few unlucky
rounds gets another look, less and less of one as its rounds add up.
Each call starts from the prior again (no memory across calls), so a Generator's calls stay
reproducible: the same prompt and seed give the same tokens once the step costs are cached.

Prefill. A tier the chooser expects to use (a configuration with the draft is predicted to beat
autoregressive at the start) is prefilled before decoding, like a fixed pipeline's tiers, and
counted as prefill: brought up at its first switch-in instead, its whole prompt prefill (0.4-0.7 s
for the 0.5B at 32K on an H200) would land inside the decode and cost more than speculation saves
over a few hundred tokens.

Choice. A round of tier k verifying gamma_k tokens yields (1 - a^(g+1)) / (1 - a) tokens in
expectation; its cost is the verification step plus producing gamma_k tokens below (recursively:
rounds of the tier below, or gamma single steps at the last tier). The chooser runs the
configuration with the most expected tokens per ms, autoregressive included (1 token per AR step),
re-deciding every `REDECIDE_ROUNDS` target rounds when new acceptance was observed, and switching
only for a predicted gain over `SWITCH_MARGIN` whose time saved over the remaining tokens exceeds
the switch's cost (the catch-up of any tier switched in, as predicted from its step cost or as
its last switch-in took, whichever is more). Every step is also charged the host time per forward
observed so far in the run beyond the measured step costs (sampling, verification, bookkeeping):
for a small model that is comparable to its step, and it favours fewer, longer steps. Budget:
fixed at the start of each generation
(the acceptance at other budgets cannot be observed online).

Losslessness. Each target round is an exact speculative-sampling round given the prefix: the
target accepts draft token i with min(1, p/q) and otherwise samples from norm(max(0, p - q)), so
the token it emits is distributed as p whatever draft (or draft length) proposed it; with no draft
(autoregressive) it samples p directly. The chooser's decision before a round depends only on
tokens and timings of *earlier* rounds, never on the randomness of the round it configures, so
conditioned on the prefix each round's output is exactly the target's distribution, and by
induction so is the whole sequence. The same holds at every lower level (the middle tier's output
is exactly its own distribution). Caches switched in only catch up on accepted tokens. With
`auto`, a seed fixes the output only up to the timing-dependent choices; greedy output is the
autoregressive output either way.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from triforce.models.llama import Transformer, cache_dir
from triforce.sampling import RowStreams

GAMMAS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)  # target gamma candidates
DRAFT_GAMMAS = (1, 2, 3, 4, 6, 8)  # middle-tier gamma candidates (tiny draft steps per retrieval round)
BUDGETS = (256, 512, 1024, 2048, 4096)
MEASURED_SIZES = (1, 2, 3, 5, 9, 17, 33)  # step sizes timed (others interpolated), as far as a tier needs
PRIOR_ACCEPTANCE, PRIOR_WEIGHT = 0.7, 10.0
REDECIDE_ROUNDS = 4
SWITCH_MARGIN = 1.03
ROLES = {"autoregressive": ("target",), "retrieval": ("target", "middle"), "draft": ("target", "draft"),
         "triforce": ("target", "middle", "draft")}
# what `auto` means under tensor parallelism: per-rank timings could pick different configurations
TP_DEFAULTS = {"pipeline": "triforce", "gamma": 6, "draft_gamma": 4, "budget": 1024}


@dataclass(frozen=True)
class AutoSettings:
    """The candidates the chooser may pick from; one value each for keys set explicitly."""

    pipelines: tuple[str, ...]
    gammas: tuple[int, ...]
    draft_gammas: tuple[int, ...]
    budgets: tuple[int, ...]
    budget_auto: bool = False

    @property
    def adaptive(self) -> bool:
        if self.pipelines == ("autoregressive",):
            return False
        return len(self.pipelines) > 1 or len(self.gammas) > 1 or len(self.draft_gammas) > 1 or len(self.budgets) > 1

    @property
    def depth(self) -> int:
        """Most tokens one target round can hold beyond the sequence (for buffer and cache slack)."""
        return max(self.gammas) + max(self.draft_gammas) + 2


def int_or_auto(value, key: str, minimum: int = 1) -> int | None:
    """None for `auto`, else `value` checked to be an integer >= minimum (ValueError naming `key`)."""
    if isinstance(value, str) and value.lower() == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key} must be auto or an integer >= {minimum}, got {value!r}")
    return value


def resolve(cfg: DictConfig, tp: int = 1) -> AutoSettings:
    """Check `pipeline`, `gamma`, `draft.gamma`, `cache.budget` (auto or explicit) and return the
    candidates. Under tensor parallelism `auto` resolves to TP_DEFAULTS (written back into cfg)."""
    if cfg.pipeline != "auto" and cfg.pipeline not in ROLES:
        raise ValueError(f"pipeline must be auto or one of {list(ROLES)}, got {cfg.pipeline!r}")
    chunk = cfg.cache.chunk_size
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"cache.chunk_size must be an integer >= 1, got {chunk!r}")
    gamma = int_or_auto(cfg.gamma, "gamma")
    draft_gamma = int_or_auto(cfg.draft.gamma, "draft.gamma")
    budget = int_or_auto(cfg.cache.budget, "cache.budget", minimum=chunk)
    if tp > 1:
        cfg.pipeline = TP_DEFAULTS["pipeline"] if cfg.pipeline == "auto" else cfg.pipeline
        cfg.gamma = gamma = gamma or TP_DEFAULTS["gamma"]
        cfg.draft.gamma = draft_gamma = draft_gamma or TP_DEFAULTS["draft_gamma"]
        cfg.cache.budget = budget = budget or TP_DEFAULTS["budget"]
    pipelines = tuple(ROLES) if cfg.pipeline == "auto" else (cfg.pipeline,)
    return AutoSettings(pipelines, (gamma,) if gamma else GAMMAS, (draft_gamma,) if draft_gamma else DRAFT_GAMMAS,
                        (budget,) if budget else BUDGETS, budget_auto=budget is None)


def graph_sizes(settings: AutoSettings, role: str) -> set[int]:
    """Step sizes worth a CUDA graph for a tier in `role` under any candidate configuration."""
    sizes = {1, 2, 3}
    if role != "draft":
        for g in settings.gammas if role == "target" else settings.draft_gammas:
            sizes |= {g + 1, g + 2}
    return sizes


def measured_sizes(gammas: tuple[int, ...]) -> set[int]:
    """Step sizes to time for a verifier of these gammas: a few, spanning them (the rest interpolated)."""
    need = {g + 1 for g in gammas}
    return {1} | (need & set(MEASURED_SIZES)) | {min(need), max(need)}


def expected_tokens(a: float, g: int) -> float:
    """Tokens a round of g drafts at per-token acceptance a yields: accepted run + 1 correction/bonus."""
    return g + 1.0 if a >= 1.0 else (1.0 - a ** (g + 1)) / (1.0 - a)


def budget_prior(budget: int) -> float:
    """Prior acceptance of the retrieval tier at `budget` (see the module docstring)."""
    return min(0.95, 0.65 + 0.075 * math.log2(max(budget, 1) / 256))


# ------------------------------------------------------------------------------------ cost model
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu{os.cpu_count()}x{torch.get_num_threads()}t"


class CostModel:
    """ms per step by tokens fed, per measurement key, read from and written to a JSON file."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path is not None else cache_dir() / "step_costs.json"
        try:
            self.table = json.loads(self.path.read_text())
        except (OSError, ValueError):  # absent or unreadable: measure again
            self.table = {}

    def get(self, key: str) -> dict[int, float]:
        return {int(t): ms for t, ms in self.table.get(key, {}).get("ms", {}).items()}

    def put(self, key: str, costs: dict[int, float], **extra) -> None:
        entry = self.table.setdefault(key, {"ms": {}})
        entry["ms"].update({str(t): ms for t, ms in costs.items()})
        entry.update(extra)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.table, indent=1, sort_keys=True))
        tmp.replace(self.path)


def interpolate(costs: dict[int, float], t: int) -> float:
    """Piecewise-linear ms at step size t (flat below the smallest size, extrapolated above)."""
    pts = sorted(costs.items())
    if t <= pts[0][0] or len(pts) == 1:
        return pts[0][1] if t <= pts[0][0] else pts[-1][1]
    for (t0, m0), (t1, m1) in zip(pts, pts[1:]):
        if t <= t1:
            return m0 + (m1 - m0) * (t - t0) / (t1 - t0)
    (t0, m0), (t1, m1) = pts[-2], pts[-1]
    return m1 + max(0.0, (m1 - m0) / (t1 - t0)) * (t - t1)


def monotone(costs: dict[int, float]) -> dict[int, float]:
    """Each size's ms capped by every larger size's: a step feeding fewer tokens reads the same
    weights and no more KV, so a smaller size measured slower is noise (a busy moment of a shared
    CPU, kept in the cost table) and must not make that step look dear."""
    out, low = {}, math.inf
    for t in sorted(costs, reverse=True):
        low = min(low, costs[t])
        out[t] = low
    return out


def tier_key(tier, bucket: int) -> str:
    """What a tier's step cost depends on besides device and dtype: model shape, cache kind and size,
    context bucket (a streaming cache's steps do not depend on the context), CUDA graphs."""
    m, c = tier.model, tier.cache.rows[0]  # a batch's rows are caches of one kind (the key adds the row count)
    shape = (f"{type(m).__name__}:{m.args.vocab_size}x{m.args.dim}x{m.args.n_layers}x{m.args.n_heads}/"
             f"{m.args.n_kv_heads}x{m.args.head_dim}x{m.args.intermediate_size}" if isinstance(m, Transformer)
             else type(m).__name__)
    kind = type(c).__name__
    if hasattr(c, "budget") and hasattr(c, "chunk"):
        kind += f"{c.budget}/{c.chunk}"
    if hasattr(c, "window"):
        kind += f"{c.sinks}+{c.window}"
    else:
        kind += f"@{bucket}"
    return f"{tier.name}:{shape}|{kind}|graphs={tier.graphed is not None}"


# ------------------------------------------------------------------------------------ chooser
@dataclass(frozen=True)
class Config:
    pipeline: str
    gammas: tuple[int, ...] = ()  # one per verifying tier, target first

    @property
    def label(self) -> str:
        return self.pipeline + (" g=" + "/".join(map(str, self.gammas)) if self.gammas else "")


@dataclass
class Segment:
    config: str
    tokens: int = 0
    rounds: int = 0
    seconds: float = 0.0
    predicted_tokens_per_second: float = 0.0


@dataclass
class Pair:
    """Observed acceptance of one (verifier, drafter) pair, with its prior."""

    prior: float
    proposed: int = 0
    accepted: int = 0
    rejections: int = 0

    @property
    def estimate(self) -> float:
        """Per-token acceptance: accepted over judged draft tokens, with PRIOR_WEIGHT pseudo-tokens."""
        return (self.accepted + self.prior * PRIOR_WEIGHT) / (self.accepted + self.rejections + PRIOR_WEIGHT)

    @property
    def optimistic(self) -> float:
        """The estimate plus one standard deviation of it (at most 0.99): what a pair the running
        configuration no longer observes is credited with, so a few unlucky rounds do not keep its
        pipeline out for the rest of the run (the uncertainty shrinks as its rounds add up)."""
        a, n = self.estimate, self.accepted + self.rejections + PRIOR_WEIGHT
        return max(a, min(0.99, a + math.sqrt(a * (1.0 - a) / n)))


class Chooser:
    """Picks the configuration before each target round (`SpeculativeEngine(..., chooser=)`).

    `target` is the target tier; `middles` maps candidate budgets to retrieval-tier Tiers (empty:
    no retrieval tier); `draft` is the bottom tier or None. `ident` names the device, dtype and
    model for the cost table. A chooser serves one `generate` call, of one sequence or a batch.

    A batch of B rows is one decision for all rows: every configuration's round costs the batched
    steps (measured on the batch's own caches, a cost-table entry per B) and yields each row its
    expected tokens, so the best configuration per row is the best for the batch; acceptance is
    pooled over the rows. `prompt_len` is the shortest row's prompt (what a retrieval budget must
    stay under), `context` the longest (the cost's context bucket; a draft window holding it is the target).
    """

    def __init__(self, settings: AutoSettings, target, middles: dict, draft, ident: str,
                 costs: CostModel | None = None, prompt_len: int = 0, new_tokens: int = 0,
                 context: int | None = None):
        self.settings, self.target, self.middles, self.draft = settings, target, dict(middles), draft
        self.costs = costs if costs is not None else CostModel()
        self.prompt_len, self.new_tokens = prompt_len, new_tokens
        self.context = prompt_len if context is None else context
        self.tiers = [target, *self.middles.values()] + ([draft] if draft is not None else [])
        self.rows = len(target.cache.rows)
        bucket = 1 << max(0, self.context - 1).bit_length()
        batch = f"|rows={self.rows}" if self.rows > 1 else ""
        self.keys = {id(t): f"{ident}|{tier_key(t, bucket)}{batch}" for t in self.tiers}
        self.max_depth = settings.depth
        self.pairs: dict[tuple[str, str], Pair] = {}
        self.budget = None
        self.config: Config | None = None
        self.segments: list[Segment] = []
        self.measure_seconds = 0.0
        self.measured: list[str] = []
        self.rounds_since = 0
        self._seen: dict[int, tuple[int, int, int]] = {}
        self.switch_in_ms: dict[str, float] = {}  # the last observed catch-up of a tier switched in, by role
        # host work per forward beyond the measured step costs (sampling, verification, bookkeeping),
        # observed over the run: wall ms minus the steps' predicted ms, over the forwards run
        self.host_excess_ms, self.host_forwards = 0.0, 0
        self._mark: tuple | None = None
        self._first_stretch = True  # the generation's first stretch is left out of the host time
        self._captured_before = 0.0  # graph-capture seconds of the tiers before the decode started
        self._curves: dict[str, dict[int, float]] = {}  # cost-table entries as `ms` reads them, by key
        self.why = ""

    # ---------------------------------------------------------------- availability
    def pipelines(self) -> list[str]:
        """Candidate pipelines whose tiers exist (auto skips a draft that would be the target)."""
        out = []
        for p in self.settings.pipelines:
            roles = ROLES[p]
            if "middle" in roles and not self.middles:
                continue
            if "draft" in roles and (self.draft is None or (len(self.settings.pipelines) > 1 and self._draft_is_target())):
                continue
            out.append(p)
        return out or ["autoregressive"]

    def _draft_is_target(self) -> bool:
        """A draft with the target's weights whose window holds the whole run is the target, only slower."""
        m, t = self.draft.model, self.target.model
        window = getattr(self.draft.cache, "sinks", 0) + getattr(self.draft.cache, "window", 0)
        return (isinstance(m, Transformer) and m.embed_tokens is t.embed_tokens and m.args.n_layers == t.args.n_layers
                and window >= self.context + self.new_tokens)

    def tier(self, role: str):
        return {"target": self.target, "middle": self.middles.get(self.budget), "draft": self.draft}[role]

    # ---------------------------------------------------------------- measurement
    def _sizes(self, role: str) -> set[int]:
        if role == "target":
            return {1} | (measured_sizes(self.settings.gammas) if self.pipelines() != ["autoregressive"] else set())
        if role == "middle":
            return {1} | (measured_sizes(self.settings.draft_gammas) if "triforce" in self.pipelines() else set())
        return {1, 2}

    def _measure(self, engine, tier, role: str, sizes: set[int] | None = None) -> None:
        key = self.keys[id(tier)]
        have = self.costs.get(key)
        missing = sorted((self._sizes(role) if sizes is None else sizes) - set(have))
        if not missing:
            return
        t0 = time.perf_counter()
        rows = tier.cache.rows
        extra = {}
        if tier is not self.target:  # fill each row's cache as decoding would (adopt, or a window of the prompt)
            tier.cache.reset()
            for b, cache in enumerate(rows):
                n = engine.lens[b] - 1
                if not cache.adopt_prefix(n):
                    keep = getattr(cache, "sinks", 0) + getattr(cache, "window", n)
                    for a in range(max(0, n - keep), n, engine.prefill_chunk):
                        tier.model(engine.seqs[b:b + 1, a:min(n, a + engine.prefill_chunk)], cache, last=0)
        base = [cache.length for cache in rows]

        def back() -> None:
            for cache, n in zip(rows, base):
                cache.truncate(n)

        def last(t: int) -> torch.Tensor:  # each row's last t known tokens (its prompt repeated if shorter), [B, t]
            out = []
            for b in range(len(rows)):
                ids = engine.seqs[b, :engine.lens[b]]
                out.append(ids[-t:] if ids.numel() >= t else ids.repeat(t // ids.numel() + 1)[:t])
            return torch.stack(out)

        streams = RowStreams(list(range(len(rows))), engine.device)  # not the engine's: the run stays seeded
        sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
        if getattr(tier.cache, "select_next", False):  # the retrieval tier's one-off selection step
            s0 = time.perf_counter()
            tier.distributions(last(1), 1, engine.temperature, engine.top_p, streams)
            sync()
            extra["select_ms"] = 1e3 * (time.perf_counter() - s0)
            back()
        got = {}
        for t in missing:
            tokens = last(t)
            times = []
            # the first is a warm-up (the graph capture on GPU); the minimum of the rest, so that a
            # busy moment of a shared CPU does not pass for the step's cost
            for _ in range(3 if engine.device.type == "cuda" else 4):
                back()
                sync()
                s0 = time.perf_counter()
                tier.distributions(tokens, t, engine.temperature, engine.top_p, streams if t == 1 else None)
                sync()
                times.append(1e3 * (time.perf_counter() - s0))
            got[t] = min(times[1:])
        back()
        if tier is not self.target:
            tier.cache.reset()  # every row's cache; brought up again (adopt / prefill) if chosen
        self.costs.put(key, got, context=self.context, **extra)
        self._curves.pop(key, None)
        self.measure_seconds += time.perf_counter() - t0
        self.measured.append(key)

    def ms(self, role: str, t: int) -> float:
        key = self.keys[id(self.tier(role))]
        if key not in self._curves:  # a decision asks for hundreds of costs: read each entry once
            self._curves[key] = monotone(self.costs.get(key))
        return interpolate(self._curves[key], t)

    # ---------------------------------------------------------------- prediction
    def pair(self, upper: str, lower: str) -> Pair:
        key = (upper, lower) if lower != "middle" else (upper, f"middle{self.budget}")
        if key not in self.pairs:
            self.pairs[key] = Pair(budget_prior(self.budget) if lower == "middle" else PRIOR_ACCEPTANCE)
        return self.pairs[key]

    def acceptance(self, upper: str, lower: str) -> float:
        """The pair's estimate if the running configuration observes it or it was never observed (its
        prior), else its optimistic estimate. In the H200 runs the first rounds of the 7B shape landed
        on hard positions: after 12 tokens of triforce 12/6 the chooser moved to the tiny draft alone,
        which never judges the retrieval tier, so that pair's low early estimate stood; it came back
        at 6/6 and climbed to 8/8 or 12/8 over the rest of the run (0.85x and 0.67x the best fixed
        gamma 16 at 0.9 and 0.95)."""
        p = self.pair(upper, lower)
        running = self.config is not None and (upper, lower) in zip(ROLES[self.config.pipeline], ROLES[self.config.pipeline][1:])
        return p.estimate if running or p.accepted + p.rejections == 0 else p.optimistic

    def rate(self, config: Config) -> float:
        """Expected target tokens per ms of `config`: one target round's expected tokens over its cost
        (the tier below producing gamma tokens, then the target verifying gamma + 1)."""
        roles, h = ROLES[config.pipeline], self.host_ms

        def produce(level: int, n: int) -> float:  # ms for tier `level` to emit n tokens
            if level == len(roles) - 1:
                return n * (self.ms(roles[level], 1) + h)
            g = config.gammas[level]
            e = expected_tokens(self.acceptance(roles[level], roles[level + 1]), g)
            return max(1.0, n / e) * (produce(level + 1, g) + self.ms(roles[level], g + 1) + h)

        if len(roles) == 1:
            return 1.0 / (self.ms("target", 1) + h)
        g = config.gammas[0]
        return expected_tokens(self.acceptance("target", roles[1]), g) / (produce(1, g) + self.ms("target", g + 1) + h)

    @property
    def host_ms(self) -> float:
        """Observed host ms per forward beyond the step costs (0 until observed; never negative)."""
        return max(0.0, self.host_excess_ms / self.host_forwards) if self.host_forwards else 0.0

    def _observe_host(self, engine) -> None:
        """Fold the wall time since the last mark, less the predicted cost of the forwards run in it,
        into the host overhead per forward. Small models pay a host cost per forward comparable to
        their step (SmolLM2 on a GPU; any model on a CPU), which favours fewer, longer steps.
        A stretch in which a CUDA graph was captured is left out: a capture's warm-up and compiles
        are one-off (on the H200 they made 0.71 ms per forward of a 7B run whose steady host cost
        was 0.13-0.27, and the chooser then took gamma 6 where 16 won). So is the generation's first
        stretch: its first rounds do once-per-prompt work (the retrieval tier's selection over the
        prompt, each graph's first replay), 40-110 ms at 64K on the H200, which as host time made
        1-2 ms per forward, sent a 7B run to the tiny draft's short rounds and took a hundred tokens
        to wash out (the fixed pipelines pay that work too, once)."""
        now = time.perf_counter()
        forwards = {id(t): t.stats.forwards for t in self.tiers}
        captures = self._captures()[0]
        if self._mark is not None and self._mark[2] == self.config and self._mark[3] == captures:
            t0, before, _, _ = self._mark
            roles = ROLES[self.config.pipeline]
            predicted, n = 0.0, 0
            for level, role in enumerate(roles):
                tier = self.tier(role)
                k = forwards[id(tier)] - before.get(id(tier), 0)
                size = 1 if level == len(roles) - 1 else self.config.gammas[level] + 1
                predicted += k * self.ms(role, size)
                n += k
            if n and self._first_stretch:
                self._first_stretch = False
            elif n:
                self.host_excess_ms += 1e3 * (now - t0) - predicted
                self.host_forwards += n
        self._mark = (now, forwards, self.config, captures)

    def _captures(self) -> tuple[int, float]:
        """CUDA-graph captures of this chooser's tiers so far in the process: how many, and seconds."""
        graphed = [t.graphed for t in self.tiers if t.graphed is not None]
        return sum(g.captures for g in graphed), sum(g.capture_seconds for g in graphed)

    def tps(self, rate: float) -> float:
        """Tokens per second of the whole batch at `rate` (expected tokens per ms of one row)."""
        return 1e3 * rate * self.rows

    def candidates(self) -> list[Config]:
        out = []
        for p in self.pipelines():
            n = len(ROLES[p]) - 1
            if n == 0:
                out.append(Config(p))
            elif n == 1:
                out += [Config(p, (g,)) for g in self.settings.gammas]
            else:
                out += [Config(p, (g, d)) for g in self.settings.gammas for d in self.settings.draft_gammas]
        return out

    # ---------------------------------------------------------------- engine hooks
    def start(self, engine) -> None:
        """After the target's prefill: measure what the cost table lacks, pick budget and config."""
        roles = {r for p in self.pipelines() for r in ROLES[p]}
        if "autoregressive" in self.pipelines() and roles != {"target"} and not self._may_pay(engine, roles):
            config = Config("autoregressive")
            self._switch(engine, config, 1.0 / self.ms("target", 1))
            return
        self._measure(engine, self.target, "target")
        if "draft" in roles:
            self._measure(engine, self.draft, "draft")
        if "middle" in roles:  # the budget whose best configuration with the retrieval tier is fastest
            score = {}
            for self.budget in self.middles:
                self._measure(engine, self.middles[self.budget], "middle")
                score[self.budget] = max(self.rate(c) for c in self.candidates() if "middle" in ROLES[c.pipeline])
            self.budget = max(score, key=score.get)
        rates = [(c, self.rate(c)) for c in self.candidates()]
        if self.new_tokens > 0:  # the least predicted time for the tokens asked, the captures it needs included
            config, rate = min(rates, key=lambda x: self.new_tokens / x[1] + self.capture_ms(x[0]))
        else:
            config, rate = max(rates, key=lambda x: x[1])
        ar = 1.0 / self.ms("target", 1)
        self.why = self._why(config, rate, ar)
        if "draft" in roles and any(r > ar for c, r in rates if "draft" in ROLES[c.pipeline]):
            engine.bring_up_now(self.draft)  # the draft will likely run: prefill it now, as a fixed pipeline does
        self._switch(engine, config, rate)

    def _may_pay(self, engine, roles: set[str]) -> bool:
        """Whether any speculation could beat autoregressive, from single-token steps alone: even
        with verification as cheap as one AR step and every pair at the highest prior acceptance,
        a round of g drafts costs at least g cheapest draft steps. False (on a CPU, where every
        tier pays the same weight reads) skips the rest of the measurement."""
        self._measure(engine, self.target, "target", {1})
        cheapest = []
        if "draft" in roles:
            self._measure(engine, self.draft, "draft", {1})
            cheapest.append(self.ms("draft", 1))
        if "middle" in roles:
            for self.budget in self.middles:
                self._measure(engine, self.middles[self.budget], "middle", {1})
                cheapest.append(self.ms("middle", 1))
        c1, d1 = self.ms("target", 1), min(cheapest)
        a = max([PRIOR_ACCEPTANCE] + [budget_prior(b) for b in self.middles])
        bound = max(expected_tokens(a, g) / (c1 + g * d1) for g in self.settings.gammas)
        if bound <= 1.0 / c1:
            self.why = (f"best speculative bound (verification free, acceptance {a:.2f}, draft step {d1:.1f} ms) "
                        f"{self.tps(bound):.1f} tok/s < autoregressive {self.tps(1.0 / c1):.1f} tok/s")
            return False
        return True

    def _why(self, config: Config, rate: float, ar: float) -> str:
        if config.pipeline == "autoregressive":
            spec = [(c, self.rate(c)) for c in self.candidates() if c.pipeline != "autoregressive"]
            if not spec:
                return "no draft tier fits (the retrieval budget or the draft's window would cover the whole context)"
            c, r = max(spec, key=lambda x: x[1])
            return f"best speculative {c.label} predicted {self.tps(r):.1f} tok/s < autoregressive {self.tps(ar):.1f} tok/s"
        return f"predicted {self.tps(rate):.1f} tok/s vs autoregressive {self.tps(ar):.1f} tok/s"

    def between_rounds(self, engine) -> None:
        self.rounds_since += 1
        if self.rounds_since > REDECIDE_ROUNDS:
            self.rounds_since = 1
            self._observe_host(engine)
            if self._observe(engine):  # nothing new (e.g. autoregressive): the prediction stands
                # the configuration that saves most over the remaining tokens net of its switch cost
                # (the fastest may lack graphs that a nearly as fast one has)
                now = self.rate(self.config)
                remaining = max(0.0, self.new_tokens - engine.emitted / self.rows)
                net = [(remaining / now - remaining / rate - self.switch_cost(engine, config), config, rate)
                       for config, rate in ((c, self.rate(c)) for c in self.candidates())
                       if config != self.config and rate > now * SWITCH_MARGIN]
                gain, config, rate = max(net, key=lambda x: x[0], default=(0.0, None, 0.0))
                if gain > 0:
                    self._switch(engine, config, rate)
        self.segments[-1].rounds += 1

    def switch_cost(self, engine, config: Config) -> float:
        """Predicted ms to switch to `config`: the catch-up of each tier it adds (the tokens that tier
        has not seen, fed in one step, none for a tier reading the target's KV; or what that tier's
        last switch-in took when that was more: a first step of an odd size can cost a kernel
        compile), plus the graph captures its steps lack. A switch pays only when the time it saves
        over the remaining tokens exceeds this."""
        using = {id(t) for t in engine.tiers}
        ms = 0.0
        for role in ROLES[config.pipeline]:
            tier = self.tier(role)
            if id(tier) in using:
                continue
            missing = max(engine.lens[b] - 1 - c.length for b, c in enumerate(tier.cache.rows))
            if tier.cache.shares_target_kv:
                missing = 0  # it reads what it missed from the target's store: no catch-up step
            ms += max(self.ms(role, max(1, missing)) if missing > 0 else 0.0, self.switch_in_ms.get(role, 0.0))
        return ms + self.capture_ms(config)

    def capture_ms(self, config: Config) -> float:
        """Predicted ms of the CUDA-graph captures `config`'s steps still lack (each tier's step of
        gamma + 1, and the bottom tier's single step): the mean of that tier's captures so far in
        this process, or its warm-ups plus one step before any. A 7B capture costs several steps,
        so a switch to a new gamma for a few rounds can cost more than it saves."""
        roles = ROLES[config.pipeline]
        ms = 0.0
        for level, role in enumerate(roles):
            graphed = self.tier(role).graphed
            if graphed is None or not graphed.capture:
                continue
            size = 1 if level == len(roles) - 1 else config.gammas[level] + 1
            if size not in graphed.sizes or size in graphed.tried_sizes:
                continue
            if graphed.captures:
                ms += 1e3 * graphed.capture_seconds / graphed.captures
            else:
                ms += (graphed.warmup + 1) * self.ms(role, size)
        return ms

    def _observe(self, engine) -> bool:
        """Fold the acceptance counted since the last look into the pairs; True if anything new."""
        changed = False
        roles = ROLES[self.config.pipeline]
        for level in range(len(roles) - 1):
            tier = self.tier(roles[level])
            now = (tier.stats.proposed, tier.stats.accepted, tier.stats.rejections)
            seen = self._seen.get(id(tier), (0, 0, 0))
            if now[0] > seen[0]:
                p = self.pair(roles[level], roles[level + 1])
                p.proposed += now[0] - seen[0]
                p.accepted += now[1] - seen[1]
                p.rejections += now[2] - seen[2]
                changed = True
            self._seen[id(tier)] = now
        return changed

    def _close_segment(self, engine) -> None:
        if self.segments:
            seg = self.segments[-1]
            now = time.perf_counter()
            seg.tokens += engine.emitted - self._seg_start[0]
            seg.seconds += now - self._seg_start[1]

    def _switch(self, engine, config: Config, rate: float) -> None:
        first = self.config is None  # the start's switch may bring a tier up from its whole prompt
        if first:  # captures from here on land in the decode (the measurement's are reported apart)
            self._captured_before = self._captures()[1]
        if not first:
            self._observe(engine)
        self._close_segment(engine)
        self._seen = {id(t): (t.stats.proposed, t.stats.accepted, t.stats.rejections) for t in self.tiers}
        self.config = config
        before, using = engine.catch_up_seconds, {id(t) for t in engine.tiers}
        added = [r for r in ROLES[config.pipeline] if id(self.tier(r)) not in using]
        engine.use([self.tier(r) for r in ROLES[config.pipeline]], list(config.gammas))
        for role in added if not first else ():  # observed, so the next decision to switch it in counts it
            self.switch_in_ms[role] = 1e3 * (engine.catch_up_seconds - before) / len(added)
        self.segments.append(Segment(config.label, predicted_tokens_per_second=self.tps(rate)))
        self._seg_start = (engine.emitted, time.perf_counter())
        self._mark = None
        self._observe_host(engine)  # a fresh mark after the catch-up, for the new configuration
        self.rounds_since = 1

    # ---------------------------------------------------------------- report
    def report(self, engine, generated: int, decode_seconds: float) -> dict:
        """What was chosen and why: configurations with token counts, costs, acceptance, predictions."""
        self._close_segment(engine)
        self._seg_start = (engine.emitted, time.perf_counter())
        configs: dict[str, dict] = {}
        for s in self.segments:
            c = configs.setdefault(s.config, {"tokens": 0, "rounds": 0, "seconds": 0.0, "segments": 0,
                                              "predicted_tokens_per_second": s.predicted_tokens_per_second})
            c["tokens"] += s.tokens
            c["rounds"] += s.rounds
            c["seconds"] += s.seconds
            c["segments"] += 1
        for c in configs.values():
            c["tokens_per_second"] = c["tokens"] / c["seconds"] if c["seconds"] > 0 else None
        main = max(configs, key=lambda k: configs[k]["tokens"])
        predicted = sum(s.tokens / s.predicted_tokens_per_second for s in self.segments if s.predicted_tokens_per_second)
        achieved = generated / decode_seconds if decode_seconds > 0 else None
        ar_cfg = configs.get("autoregressive")
        if ar_cfg and ar_cfg["tokens"] >= 8 and ar_cfg["tokens_per_second"]:
            ar, ar_source = ar_cfg["tokens_per_second"], "measured"
        else:
            ar, ar_source = self.tps(1.0 / self.ms("target", 1)), "cost model"
        costs = {}
        for t in self.tiers:
            role = "target" if t is self.target else ("draft" if t is self.draft else "middle")
            if role == "middle" and t is not self.middles.get(self.budget):
                continue
            costs[f"{role}:{t.name}"] = {"key": self.keys[id(t)],
                                         "ms": {str(k): round(v, 4) for k, v in sorted(self.costs.get(self.keys[id(t)]).items())}}
        return {
            "choice": main, "why": self.why, "budget": self.budget,
            "configs": configs, "switches": len(self.segments) - 1,
            "sequence": [[s.config, s.tokens] for s in self.segments],
            "step_costs_ms": costs, "cost_table": str(self.costs.path),
            "measured_now": self.measured, "measure_seconds": self.measure_seconds,
            "catch_up_seconds": engine.catch_up_seconds, "catch_up_tokens": engine.catch_up_tokens,
            "switch_in_ms": {r: round(v, 3) for r, v in self.switch_in_ms.items()},
            "capture_seconds": self._captures()[1] - self._captured_before,
            "host_ms_per_forward": round(self.host_ms, 4),
            "acceptance": {f"{u}<{d}": {"proposed": p.proposed, "accepted": p.accepted, "rejections": p.rejections,
                                        "prior": round(p.prior, 3),
                                        "estimate": round(p.estimate, 4)} for (u, d), p in self.pairs.items()},
            "prior_weight_tokens": PRIOR_WEIGHT,
            "predicted_tokens_per_second": generated / predicted if predicted else None,
            "achieved_tokens_per_second": achieved,
            "autoregressive_tokens_per_second": ar, "autoregressive_source": ar_source,
            "speedup_vs_autoregressive": achieved / ar if achieved and ar else None,
        }


def make_chooser(gen, tiers: list, prompt_len: int, new_tokens: int, costs: CostModel | None = None,
                 context: int | None = None) -> Chooser:
    """The chooser for one `Generator.generate` call over `tiers` (target first); for a batch,
    `prompt_len` is the shortest row's prompt and `context` the longest's.

    With `cache.budget=auto` the candidate budgets are those up to half the prompt (a budget
    covering more saves too little; one covering it all is the target) and, on GPU, what the
    memory plan fits; each gets its tier from `gen.middle_tier`. Under `pipeline=auto` a retrieval
    tier whose budget covers the prompt is left out, as is a draft that would be the target.
    """
    s = gen.auto
    target = tiers[0]
    draft = next((t for t in tiers[1:] if not t.cache.shares_target_kv), None)
    explicit = len(s.pipelines) == 1
    middles = {}
    if any("middle" in ROLES[p] for p in s.pipelines):
        if s.budget_auto:
            limit = gen.plan.budget if gen.plan is not None and gen.plan.budget else max(s.budgets)
            fit = [b for b in s.budgets if b <= prompt_len // 2 and b <= limit]
            if not fit and explicit:  # the pipeline was asked for: run it at the smallest budget
                fit = [min(s.budgets)]
            middles = {b: gen.middle_tier(b) for b in fit}
        else:
            mid = next(t for t in tiers[1:] if t.cache.shares_target_kv)
            if explicit or mid.cache.budget < prompt_len:
                middles = {mid.cache.budget: mid}
    ident = f"{device_name(gen.device)}|{str(gen.dtype).removeprefix('torch.')}|{gen.cfg.model.name}"
    return Chooser(s, target, middles, draft, ident, costs, prompt_len, new_tokens, context)
