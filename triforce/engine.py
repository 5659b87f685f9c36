"""One recursive N-tier speculation engine.

tiers[0] is the target; tier k verifies gamma_k tokens proposed by tier k+1 and the last tier
samples autoregressively. A tier's output is distributed exactly as its own processed
distribution, so each level of verification is exact and the whole chain is lossless:
`autoregressive` is [target], `retrieval` is [target, retrieval draft], `triforce` is
[target, retrieval draft, tiny draft], `draft` (classic two-tier speculation) is
[target, tiny draft] — the same code with a different list.

With a `chooser` (triforce/auto.py) the list and the gammas may change between target rounds:
the chooser calls `use` before a round, tiers switched in are brought up to date first, and the
round itself runs exactly as with a fixed list.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from tqdm import tqdm

from triforce.cache import KVCache
from triforce.models.llama import Transformer
from triforce.models.quant import QuantTransformer, refuse_quantized_target
from triforce.sampling import process_logits, sample, speculative_verify


@dataclass
class TierStats:
    proposed: int = 0  # draft tokens this tier verified
    accepted: int = 0
    rejections: int = 0  # rounds that ended at a rejected draft (not all accepted)
    rounds: int = 0  # verification rounds
    forwards: int = 0
    tokens_forwarded: int = 0
    seconds: float = 0.0
    events: list = field(default_factory=list)  # (start, end) CUDA events per forward (gpu_timing)
    accepts: list = field(default_factory=list)  # drafts accepted in each verification round, in order

    def summary(self, generated: int) -> dict:
        if self.events:  # the caller synchronised once; each pair spans one forward on the GPU's clock
            self.seconds = sum(a.elapsed_time(b) for a, b in self.events) / 1e3
        return {
            "proposed": self.proposed, "accepted": self.accepted, "rounds": self.rounds,
            "acceptance_rate": self.accepted / self.proposed if self.proposed else None,
            # tokens this tier emits per verification round (accepted drafts + 1 corrected/bonus)
            "mean_accepted_length": (self.accepted + self.rounds) / self.rounds if self.rounds else None,
            "forwards": self.forwards, "tokens_forwarded": self.tokens_forwarded,
            "seconds": self.seconds,
            "ms_per_generated_token": 1e3 * self.seconds / generated if generated else None,
            "ms_per_forward": 1e3 * self.seconds / self.forwards if self.forwards else None,
        }


@dataclass
class Tier:
    """A model, the cache it reads, and how many draft tokens it verifies per round."""

    name: str
    model: Transformer
    cache: KVCache
    gamma: int = 0  # draft tokens asked from the tier below per round (unused on the last tier)
    stats: TierStats = field(default_factory=TierStats)
    graphed: object = None  # a triforce.graphs.GraphedModel replaying this tier's steps, or None

    def distributions(self, tokens: torch.Tensor, last: int, temperature: float, top_p: float,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Feed `tokens`; processed distributions of the last `last` positions (None when 0) and,
        with a generator, a token drawn from the last one. Graphed when a graph fits the step."""
        if self.graphed is not None and self.graphed.usable(tokens.shape[1], last):
            return self.graphed.distributions(tokens, last, temperature, top_p, generator)
        logits = self.model(tokens, self.cache, last=last)
        if not last:
            return None, None
        p = process_logits(logits[0], temperature, top_p)
        return p, (sample(p[-1:], generator)[0] if generator is not None else None)


class SpeculativeEngine:
    def __init__(self, tiers: list[Tier], temperature: float, top_p: float, prefill_chunk: int = 512,
                 sync_timing: bool = False, injected_acceptance: dict[int, float] | None = None,
                 group: dist.ProcessGroup | None = None, gpu_timing: bool = False, chooser=None):
        if not tiers:
            raise ValueError("the engine needs at least the target tier")
        if isinstance(tiers[0].model, QuantTransformer):
            refuse_quantized_target(tiers[0].model.weights)
        for t in tiers[:-1] if chooser is None else []:  # a chooser sets the gammas it runs
            if t.gamma < 1:
                raise ValueError(f"gamma of tier {t.name!r} must be >= 1, got {t.gamma}")
        self.tiers, self.temperature, self.top_p = tiers, temperature, top_p
        self.prefill_chunk = prefill_chunk
        self.sync_timing = sync_timing  # synchronise the GPU around each forward for exact per-tier times
        # or time each forward between CUDA events read once at the end: the same per-tier times
        # without a host sync per forward (what the CLI uses on GPU)
        self.gpu_timing = gpu_timing and not sync_timing and tiers[0].model.device.type == "cuda"
        self.device = tiers[0].model.device
        # BENCHMARK ONLY: {level or (verifier name, drafter name): rate} replaces that tier's accept/reject decisions by independent
        # coin flips with the given per-token acceptance (random weights accept nothing). The
        # forwards still run; the output is then not the target's distribution.
        self.injected_acceptance = injected_acceptance or {}
        # tensor parallelism: every rank runs this engine in lockstep; each sampling decision is
        # broadcast from the group's rank 0 (`_agree`), so the ranks' token sequences, and with
        # them the shapes of every later forward and collective, cannot drift apart
        self.group = group
        self.src = dist.get_global_rank(group, 0) if group is not None else 0
        # adaptive speculation: consulted before each target round (triforce.auto.Chooser); it
        # knows every tier it may switch in, the engine only the ones in use
        self.chooser = chooser
        self.catch_up_seconds, self.catch_up_tokens = 0.0, 0

    # -------------------------------------------------------------------------------- one forward
    def _distributions(self, level: int, n_rows: int, draw: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tier `level`'s processed distributions for the last `n_rows` positions of the sequence,
        and with `draw` a token sampled from the last of them.

        Feeds every token the tier's cache lacks (the prefill too, in chunks); rows come back for
        positions seq_len - n_rows + 1 .. seq_len, i.e. predictions of the tokens after them.
        """
        tier = self.tiers[level]
        cache = tier.cache
        cache.truncate(self.seq_len - n_rows)
        if self.sync_timing:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if self.gpu_timing:
            ev0 = torch.cuda.Event(enable_timing=True)
            ev0.record()
        start = cache.length
        tier.stats.tokens_forwarded += self.seq_len - start
        rows, token = [], None
        while start < self.seq_len:
            end = min(self.seq_len, start + self.prefill_chunk)
            keep = max(0, n_rows - (self.seq_len - end))
            gen = self.generator if draw and end == self.seq_len else None
            p, token = tier.distributions(self.seq[None, start:end], keep, self.temperature, self.top_p, gen)
            if keep:
                rows.append(p)
            start = end
        if self.sync_timing:
            torch.cuda.synchronize()
        if self.gpu_timing:
            ev1 = torch.cuda.Event(enable_timing=True)
            ev1.record()
            tier.stats.events.append((ev0, ev1))
        tier.stats.seconds += time.perf_counter() - t0
        tier.stats.forwards += 1
        return (rows[0] if len(rows) == 1 else torch.cat(rows)), token

    def _append(self, tokens: torch.Tensor) -> None:
        n = tokens.numel()
        self.seq[self.seq_len:self.seq_len + n] = tokens
        self.seq_len += n

    def _invalidate(self, from_level: int, length: int) -> None:
        for t in self.tiers[from_level:]:
            t.cache.truncate(length)

    # -------------------------------------------------------------------------------- recursion
    def _propose(self, level: int, n: int, on_tokens=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Append n tokens drawn from tier `level`'s distribution; return them and those distributions.

        At the last tier this is plain sampling; above it, speculative rounds against the tier
        below. `on_tokens` (top level only) sees each new batch and may stop early (EOS).
        """
        tier = self.tiers[level]
        start0 = self.seq_len
        dists = []
        while self.seq_len - start0 < n:
            if level == 0 and self.chooser is not None:
                self.chooser.between_rounds(self)  # may change self.tiers and gammas; tier 0 stays
            tier.cache.begin_round()
            start = self.seq_len
            if level == len(self.tiers) - 1:
                p, token = self._distributions(level, 1, draw=True)
                self._append(self._agree(token[None]))
                dists.append(p)
            else:
                g = tier.gamma
                draft, q = self._propose(level + 1, g)
                p, _ = self._distributions(level, g + 1)
                rate = self._injected_rate(level)
                if rate is not None:
                    n_acc = self._injected(level, rate, g)
                    nxt = sample(p[n_acc][None], self.generator)[0]
                else:
                    n_acc, nxt = speculative_verify(draft, q, p, self.generator)
                if self.group is not None:
                    verdict = self._agree(torch.stack((torch.tensor(n_acc, device=nxt.device), nxt)))
                    n_acc, nxt = int(verdict[0]), verdict[1]
                tier.stats.proposed += g
                tier.stats.accepted += n_acc
                tier.stats.rejections += int(n_acc < g)
                tier.stats.rounds += 1
                tier.stats.accepts.append(n_acc)
                self.seq_len = start + n_acc
                self._invalidate(level, start + n_acc)
                self._append(nxt[None])
                dists.append(p[:n_acc + 1])
            if on_tokens is not None and on_tokens(self.seq[start:self.seq_len]):
                break
        dists = dists[0] if len(dists) == 1 else torch.cat(dists)
        if self.seq_len - start0 > n:  # a round overshot: keep the first n (still exactly distributed)
            dists = dists[:n]
            self.seq_len = start0 + n
            self._invalidate(level, start0 + n)
        # the tokens are the sequence's own: valid until the caller appends past them
        return self.seq[start0:self.seq_len], dists

    def _agree(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's `t` on every tensor-parallel rank (in place; a no-op without a group).

        Each rank would sample the same anyway (same seed, bitwise-equal logits after the
        all-reduces), but a replicated draft or a nondeterministic kernel could break that, and
        one differing token would desynchronise the ranks' collectives. A few bytes per decision
        rule it out.
        """
        if self.group is not None:
            dist.broadcast(t, src=self.src, group=self.group)
        return t

    def _injected_rate(self, level: int) -> float | None:
        """The injected rate of tier `level` verifying the tier below: keyed by level, or by the pair
        of tier names ("target", "tiny") when the tier list changes between rounds."""
        inj = self.injected_acceptance
        if not inj:
            return None
        return inj.get(level, inj.get((self.tiers[level].name, self.tiers[level + 1].name)))

    def _injected(self, level: int, rate: float, g: int) -> int:
        """Accepted drafts of a round of tier `level` at an injected per-token rate (a benchmark
        may replay recorded counts per level instead)."""
        ok = torch.rand(g, generator=self.generator, device=self.device) < rate
        return int(ok.cumprod(0).sum())

    # -------------------------------------------------------------------------------- public
    @torch.inference_mode()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, stop_ids: set[int] | None = None,
                 seed: int = 0, callback=None, progress: bool = False, token_progress: bool | None = None) -> list[int]:
        """Generate up to max_new_tokens after `prompt` (1-D ids); stops after a token in stop_ids.

        Each call is independent: caches are reset and the RNG is seeded from `seed`.
        `callback(list_of_new_ids)` streams tokens as the target accepts them; `progress` shows
        tqdm bars for the prefill and (unless `token_progress` is False) the generated tokens.
        """
        stop_ids = stop_ids or set()
        chooser = self.chooser
        depth = chooser.max_depth if chooser is not None else sum(t.gamma for t in self.tiers[:-1]) + 2
        self.seq = torch.zeros(prompt.numel() + max_new_tokens + depth, dtype=torch.long, device=self.device)
        self.seq_len = 0
        self._append(prompt.to(self.device))
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        for t in (chooser.tiers if chooser is not None else self.tiers):
            t.cache.reset()
            t.stats = TierStats()
        if chooser is not None:
            self.tiers = self.tiers[:1]  # the target alone until the chooser has decided
        self.catch_up_seconds, self.catch_up_tokens = 0.0, 0
        out: list[int] = []
        token_progress = progress if token_progress is None else token_progress
        bar = tqdm(total=max_new_tokens, desc="generate", unit="tok", disable=not token_progress, leave=False)

        def on_tokens(new: torch.Tensor) -> bool:
            first, done = len(out), False
            for tok in new.tolist():
                out.append(tok)
                if tok in stop_ids or len(out) >= max_new_tokens:
                    done = True
                    break
            bar.update(len(out) - first)
            if callback:
                callback(out[first:])
            return done

        # prefill: the target (and every tier with its own KV) absorbs the prompt but its last token
        self._prefill(progress)
        if chooser is not None:  # measures step costs on first use (reported, not decode time), picks a start
            chooser.start(self)
        self._propose(0, max_new_tokens, on_tokens)
        bar.close()
        return out

    def _prefill(self, progress: bool = False) -> None:
        """Every tier absorbs the prompt but its last token; tiers reading the target's KV adopt it."""
        t0 = time.perf_counter()
        for tier in self.tiers:
            self._bring_up(tier, progress)
        if self.sync_timing or self.gpu_timing:
            torch.cuda.synchronize()
        self.prefill_seconds = time.perf_counter() - t0

    def _bring_up(self, tier: Tier, progress: bool = False) -> int:
        """Feed `tier` every token before the last one that its cache lacks (the prefill, or the
        catch-up of a tier switched in mid-run). A cache reading the target's KV adopts it once;
        afterwards it reads the target's store for whatever it missed, so feeding it is cheap."""
        n = self.seq_len - 1
        if tier is not self.tiers[0] and tier.cache.length == 0 and tier.cache.adopt_prefix(n):
            return 0
        fed = max(0, n - tier.cache.length)
        chunks = range(tier.cache.length, n, self.prefill_chunk)
        for start in tqdm(chunks, desc=f"prefill {tier.name}", disable=not progress or len(chunks) < 8, leave=False):
            end = min(n, start + self.prefill_chunk)
            tier.model(self.seq[None, start:end], tier.cache, last=0)
        return fed

    def bring_up_now(self, tier: Tier) -> None:
        """Prefill `tier` before decoding starts (its time counts as prefill, as for a fixed pipeline's
        tiers), when the chooser expects to switch it in: a tier brought up mid-run instead delays
        the tokens after the switch by its whole prompt prefill."""
        t0 = time.perf_counter()
        self._bring_up(tier)
        if self.sync_timing or self.gpu_timing:
            torch.cuda.synchronize()
        self.prefill_seconds += time.perf_counter() - t0

    def use(self, tiers: list[Tier], gammas: list[int]) -> None:
        """Run the next rounds with `tiers` (target first) verifying `gammas` tokens each.

        Call between target rounds only (the chooser does, from `_propose`). Every cache then
        holds a prefix of the final sequence (each round truncates the tiers to what the target
        accepted), so a tier switched in needs only the tokens it has not seen.
        """
        if tiers[0] is not self.tiers[0] or len(gammas) != len(tiers) - 1:
            raise ValueError("use() keeps the target first and needs one gamma per verifying tier")
        t0 = time.perf_counter()
        for tier in tiers[1:]:
            if not any(tier is t for t in self.tiers):
                self.catch_up_tokens += self._bring_up(tier)
        for tier, g in zip(tiers, gammas):
            tier.gamma = g
        self.tiers = list(tiers)
        self.catch_up_seconds += time.perf_counter() - t0

    def stats(self, generated: int) -> dict:
        if self.gpu_timing:
            torch.cuda.synchronize()
        tiers = self.tiers if self.chooser is None else [t for t in self.chooser.tiers if t.stats.forwards]
        return {t.name: t.stats.summary(generated) for t in tiers}
