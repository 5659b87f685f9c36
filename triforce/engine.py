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

Batches: B sequences share every tier's forwards (`generate_batch`; a single sequence is a batch
of one). Each row keeps its own length, cache lengths (`cache.rows`), random stream and stop; a
forward feeds every row the same number T of tokens, the most any row lacks, so a row that lacks
fewer feeds the last of its known tokens again (its cache rolled back by that much: the same
keys are rewritten at the same positions). Verification accepts a different count per row. A
level asked for n tokens runs rounds until every row has n and keeps exactly n per row: cutting
a row's run of verified tokens at a point decided by the past only (here, the other rows'
progress) leaves it distributed as the verifier's, as the overshoot cut of a single row does.
Finished rows stay in the batch (their work is masked) until every row is done, or, when more
prompts wait than the batch has rows, a waiting prompt takes the finished row's place between two
target rounds: its caches are reset and brought up to its prompt, its stream seeded afresh, and
from then on it is a row like the others (continuous batching).
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
from triforce.sampling import RowStreams, process_logits, sample, speculative_verify_rows


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
    row_proposed: list = field(default_factory=list)  # per row of a batch (only for batches of several)
    row_accepted: list = field(default_factory=list)

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
                      streams: RowStreams | None = None, live: list[bool] | None = None
                      ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Feed `tokens` [B, T]; processed distributions [B, last, V] of the last `last` positions
        (None when 0) and, with the rows' random streams, a token [B] drawn from each row's last one
        (rows not `live` draw without moving their streams). Graphed when a graph fits the step."""
        if self.graphed is not None and self.graphed.usable(tokens.shape[1], last):
            return self.graphed.distributions(tokens, last, temperature, top_p, streams, live)
        logits = self.model(tokens, self.cache, last=last)
        if not last:
            return None, None
        p = process_logits(logits.flatten(0, 1), temperature, top_p).view(logits.shape)
        if streams is None:
            return p, None
        return p, sample(p[:, -1], uniform=streams.uniform(p.shape[-1], live))


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
        self._steps = None  # 0, 1, 2, ... on the device (a batch's token positions)

    # -------------------------------------------------------------------------------- the rows
    @property
    def seq(self) -> torch.Tensor:
        """The first row's token buffer: the whole state of a single sequence."""
        return self.seqs[0]

    @property
    def seq_len(self) -> int:
        """The first row's length."""
        return self.lens[0]

    def _start(self, prompts: list[torch.Tensor], capacity: int, seeds: list[int]) -> None:
        """Token buffers, lengths and one random stream per row."""
        self.batch = len(prompts)
        self.seqs = torch.zeros(self.batch, capacity, dtype=torch.long, device=self.device)
        for b, prompt in enumerate(prompts):
            self.seqs[b, :prompt.numel()] = prompt.to(self.device)
        self.lens = [p.numel() for p in prompts]
        self.jobs = list(range(self.batch))  # which prompt each row decodes (rows are reused)
        # a batch's lengths live on the device too, so its token windows and appends need no copy from the host
        self.lens_t = torch.tensor(self.lens, device=self.device) if self.batch > 1 else None
        self.streams = RowStreams(seeds, self.device)
        # BENCHMARK ONLY: the coin flips of injected acceptance (not the rows' streams)
        self.injection_generator = torch.Generator(device=self.device).manual_seed(seeds[0])
        self.injection_uniforms = None  # the target's, one per row and position (drawn on first use)
        self.live = [True] * self.batch  # rows still generating (the top level's mask)

    def _positions(self, starts: torch.Tensor, t: int) -> torch.Tensor:
        """Positions starts[b] + 0 .. t-1 of every row, [B, t]."""
        if self._steps is None or self._steps.numel() < t:
            self._steps = torch.arange(max(t, 64), device=self.device)
        return starts[:, None] + self._steps[:t]

    def _window(self, t: int) -> torch.Tensor:
        """The last t tokens of every row, [B, t]."""
        if self.batch == 1:
            n = self.lens[0]
            return self.seqs[:, n - t:n]
        return self.seqs.gather(1, self._positions(self.lens_t - t, t))

    def _span(self, starts: list[int], starts_t: torch.Tensor | None, n: int) -> torch.Tensor:
        """Tokens starts[b] .. starts[b] + n - 1 of every row, [B, n]."""
        if self.batch == 1:
            return self.seqs[:, starts[0]:starts[0] + n]
        return self.seqs.gather(1, self._positions(starts_t, n))

    def _push(self, tokens: torch.Tensor) -> None:
        """Append one token per row (tokens [B])."""
        if self.batch == 1:
            self.seqs[0, self.lens[0]] = tokens[0]
            self.lens[0] += 1
            return
        self.seqs.scatter_(1, self.lens_t[:, None], tokens[:, None])
        self.lens_t += 1
        self.lens = [n + 1 for n in self.lens]

    def _set_lens(self, lens: list[int], lens_t: torch.Tensor | None) -> None:
        self.lens = list(lens)
        if self.batch > 1:
            self.lens_t = lens_t

    def _invalidate(self, from_level: int, lengths: list[int]) -> None:
        """Roll every row of the tiers from `from_level` down back to `lengths`."""
        for t in self.tiers[from_level:]:
            for cache, n in zip(t.cache.rows, lengths):
                cache.truncate(n)

    # -------------------------------------------------------------------------------- one forward
    def _distributions(self, level: int, n_rows: int, draw: bool | list[bool] = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tier `level`'s processed distributions [B, n_rows, V] for the last `n_rows` positions of
        every row, and with `draw` a token [B] sampled from each row's last one.

        Feeds every token the tier's caches lack (the prefill too, in chunks); rows come back for
        positions len - n_rows + 1 .. len, i.e. predictions of the tokens after them. `draw` may
        name the rows that draw from their own streams (the others use a throwaway one). All rows of
        a batch are fed the same number of tokens, the most any row lacks (in a batch that is a few:
        every tier is brought up to each prompt first, row by row, and rounds keep rows in step).
        """
        tier = self.tiers[level]
        rows = tier.cache.rows
        for b, cache in enumerate(rows):
            cache.truncate(self.lens[b] - n_rows)
        t = max(n - cache.length for n, cache in zip(self.lens, rows))
        if self.batch > 1:
            for n, cache in zip(self.lens, rows):
                cache.truncate(n - t)  # a row lacking fewer tokens feeds its last known ones again
        if self.sync_timing:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if self.gpu_timing:
            ev0 = torch.cuda.Event(enable_timing=True)
            ev0.record()
        tier.stats.tokens_forwarded += t * self.batch
        window = self._window(t)
        out, token = [], None
        for start in range(0, t, self.prefill_chunk):
            end = min(t, start + self.prefill_chunk)
            keep = max(0, n_rows - (t - end))
            streams = self.streams if draw and end == t else None
            p, token = tier.distributions(window[:, start:end], keep, self.temperature, self.top_p, streams,
                                          draw if isinstance(draw, list) else None)
            if keep:
                out.append(p)
        if self.sync_timing:
            torch.cuda.synchronize()
        if self.gpu_timing:
            ev1 = torch.cuda.Event(enable_timing=True)
            ev1.record()
            tier.stats.events.append((ev0, ev1))
        tier.stats.seconds += time.perf_counter() - t0
        tier.stats.forwards += 1
        return (out[0] if len(out) == 1 else torch.cat(out, dim=1)), token

    # -------------------------------------------------------------------------------- recursion
    def _propose(self, level: int, n: int, on_tokens=None, active: list[bool] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Append n tokens to every row, drawn from tier `level`'s distribution; return them [B, n]
        and those distributions [B, n, V] (None at the top level, where nobody verifies them).

        At the last tier this is plain sampling; above it, speculative rounds against the tier
        below. `on_tokens(starts)` (top level only) sees each round's new tokens, row b's from
        position starts[b], and updates `self.live` (rows not yet done: EOS or their token limit).
        Rows not `active` (their result is discarded above) and rows that already have n tokens
        ride along in the forwards but draw nothing from their random streams and count in no
        statistic: each row then consumes exactly the draws, and runs exactly the rounds, of a
        single run of its own, so a batch row equals that run (up to floating-point reassociation).
        """
        tier = self.tiers[level]
        batch = self.batch
        active = [True] * batch if active is None else active
        start0, start0_t = list(self.lens), (self.lens_t.clone() if batch > 1 else None)
        keep_dists = level > 0
        steps, dists = [], [[] for _ in range(batch)]
        while True:
            live = (list(self.live) if on_tokens is not None else
                    [a and m - s < n for a, m, s in zip(active, self.lens, start0)])
            if not any(live):
                break
            if level == 0 and self.chooser is not None:
                self.chooser.between_rounds(self)  # may change self.tiers and gammas; tier 0 stays
            tier.cache.begin_round()
            start, start_t = list(self.lens), (self.lens_t.clone() if batch > 1 else None)
            if level == len(self.tiers) - 1:
                p, token = self._distributions(level, 1, draw=live)
                self._push(self._agree(token))
                if keep_dists:
                    steps.append(p)
            else:
                g = tier.gamma
                draft, q = self._propose(level + 1, g, active=live)
                p, _ = self._distributions(level, g + 1)
                rate = self._injected_rate(level)
                if rate is not None:
                    n_t = self._injected(level, rate, g, start_t if batch > 1 else start)
                    nxt = sample(p[torch.arange(batch, device=p.device), n_t],
                                 uniform=self.streams.uniform(p.shape[-1], live))
                else:
                    n_t, nxt = speculative_verify_rows(draft, q, p, self.streams, live)
                if self.group is not None:
                    verdict = self._agree(torch.cat((n_t, nxt)))
                    n_t, nxt = verdict[:batch], verdict[batch:]
                n_acc = n_t.tolist()  # the round's one host sync
                st = tier.stats
                for b, a in enumerate(n_acc):
                    if live[b]:
                        st.proposed += g
                        st.accepted += a
                        st.rejections += int(a < g)
                        st.rounds += 1  # one verification per row
                        st.accepts.append(a)
                        if st.row_proposed:
                            st.row_proposed[self.jobs[b]] += g
                            st.row_accepted[self.jobs[b]] += a
                lens = [s + a for s, a in zip(start, n_acc)]
                self._set_lens(lens, start_t + n_t if batch > 1 else None)
                self._invalidate(level, lens)
                self._push(nxt)
                if keep_dists:
                    for b, a in enumerate(n_acc):
                        if live[b]:
                            dists[b].append(p[b, :a + 1])
            if on_tokens is not None:
                on_tokens(start)
            elif any(m - s > n for m, s in zip(self.lens, start0)):
                # rows past their n wait there (ridden along, then cut back): a row never grows more
                # than one round beyond what it owes, so the caches' margin of one speculation depth holds
                lens = [min(m, s + n) for m, s in zip(self.lens, start0)]
                self._set_lens(lens, torch.minimum(self.lens_t, start0_t + n) if batch > 1 else None)
                self._invalidate(level, lens)
        if on_tokens is not None:
            return self._span(start0, start0_t, 0), None
        if any(m - s != n for m, s in zip(self.lens, start0)):  # a round overshot: keep the first n (still exactly distributed)
            lens = [s + n for s in start0]
            self._set_lens(lens, start0_t + n if batch > 1 else None)
            self._invalidate(level, lens)
        if not keep_dists:
            out = None
        elif steps:
            out = steps[0] if len(steps) == 1 else torch.cat(steps, dim=1)
            out = out[:, :n]
        else:  # rows that never ran here (discarded above) get zeros: nobody reads them
            blank = torch.zeros_like(next(d for d in dists if d)[0][:1]).expand(n, -1)
            out = torch.stack([(d[0] if len(d) == 1 else torch.cat(d))[:n] if d else blank for d in dists])
        # the tokens are the rows' own: valid until the caller appends past them
        return self._span(start0, start0_t, n), out

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

    def _injected(self, level: int, rate: float, g: int, start: torch.Tensor | list[int]) -> torch.Tensor:
        """Accepted drafts [B] of a round of tier `level` at an injected per-token rate, the drafts
        sitting at positions start[b] .. start[b] + g - 1 (a benchmark may replay recorded counts
        per level instead). Drawn from a generator of their own, not the rows' streams.

        The target's decisions are fixed per position, not per round: the draft at row b's position
        p passes iff u[b, p] < rate, with u drawn once per generation from the seed. Any gamma or
        pipeline run with the same seed then meets the same hard positions, as a real text has them
        (common random numbers): comparing configurations compares them, not the luck of their
        draws (per-round draws had a fixed gamma 16 draw 10.4 tokens per round where 8.3 were
        expected, and the best of ten fixed runs was mostly the luckiest). Lower tiers' drafts are
        re-tested after the target rolls them back, in a changed context, so theirs stay fresh
        draws per round."""
        if level > 0:
            ok = torch.rand(self.batch, g, generator=self.injection_generator, device=self.device) < rate
            return ok.cumprod(1).sum(1)
        if self.injection_uniforms is None:
            positions = torch.Generator(device=self.device).manual_seed(self.injection_generator.initial_seed() + 1)
            self.injection_uniforms = torch.rand(self.batch, self.seqs.shape[1] + 1, generator=positions,
                                                 device=self.device)
        starts = torch.as_tensor(start, device=self.device).view(-1, 1)
        idx = (starts + torch.arange(g, device=self.device)).clamp_(max=self.seqs.shape[1])
        ok = self.injection_uniforms.gather(1, idx) < rate
        return ok.cumprod(1).sum(1)

    # -------------------------------------------------------------------------------- public
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, stop_ids: set[int] | None = None,
                 seed: int = 0, callback=None, progress: bool = False, token_progress: bool | None = None) -> list[int]:
        """Generate up to max_new_tokens after `prompt` (1-D ids); stops after a token in stop_ids.

        Each call is independent: caches are reset and the RNG is seeded from `seed`.
        `callback(list_of_new_ids)` streams tokens as the target accepts them; `progress` shows
        tqdm bars for the prefill and (unless `token_progress` is False) the generated tokens.
        """
        rows_callback = (lambda b, ids: callback(ids)) if callback is not None else None
        return self.generate_batch([prompt], max_new_tokens, stop_ids, [seed], rows_callback, progress, token_progress)[0]

    @torch.inference_mode()
    def generate_batch(self, prompts: list[torch.Tensor], max_new_tokens: int | list[int],
                       stop_ids: set[int] | None = None, seeds: list[int] | None = None, callback=None,
                       progress: bool = False, token_progress: bool | None = None,
                       rows: int | None = None) -> list[list[int]]:
        """Generate after each of `prompts` (1-D ids) in one batch: every tier's forward serves all rows.

        Each tier's cache holds `rows` rows (default: one per prompt; `Rows`, or a plain cache for
        one). Prompt i stops after a token in stop_ids or max_new_tokens[i] tokens, is seeded with
        seeds[i] (default i) and is distributed exactly as a single run of it. With fewer rows than
        prompts the first `rows` prompts start and each later one takes the row of one that
        finished; otherwise a finished row stays in the batch, rolled back each round, until all are
        done. `callback(i, new_ids)` streams prompt i's tokens.
        """
        stop_ids = stop_ids or set()
        n_jobs = len(prompts)
        if n_jobs < 1:
            raise ValueError("generate_batch needs at least one prompt")
        batch = n_jobs if rows is None else rows
        if not 1 <= batch <= n_jobs:
            raise ValueError(f"rows must be in 1..{n_jobs} (the prompts), got {rows}")
        maxes = [max_new_tokens] * n_jobs if isinstance(max_new_tokens, int) else list(max_new_tokens)
        seeds = list(range(n_jobs)) if seeds is None else list(seeds)
        if len(maxes) != n_jobs or len(seeds) != n_jobs:
            raise ValueError(f"{n_jobs} prompts need {n_jobs} max_new_tokens and seeds")
        chooser = self.chooser
        every_tier = chooser.tiers if chooser is not None else self.tiers
        for t in every_tier:
            if len(t.cache.rows) != batch:
                raise ValueError(f"tier {t.name!r} has caches for {len(t.cache.rows)} rows, the batch has {batch}")
        depth = chooser.max_depth if chooser is not None else sum(t.gamma for t in self.tiers[:-1]) + 2
        self._start(prompts[:batch], max(p.numel() + m for p, m in zip(prompts, maxes)) + depth, seeds[:batch])
        for t in every_tier:
            t.cache.reset()
            t.stats = TierStats(row_proposed=[0] * n_jobs, row_accepted=[0] * n_jobs) if n_jobs > 1 else TierStats()
        if chooser is not None:
            self.tiers = self.tiers[:1]  # the target alone until the chooser has decided
        self.catch_up_seconds, self.catch_up_tokens = 0.0, 0
        outs: list[list[int]] = [[] for _ in range(n_jobs)]
        done, frozen = [False] * batch, [0] * batch
        waiting = list(range(batch, n_jobs))[::-1]  # prompts not yet given a row (popped from the end)
        # seconds from the end of the prefill: when each prompt got its row (and its prefill) and finished
        self.admit_seconds, self.finish_seconds = [0.0] * n_jobs, [None] * n_jobs
        self.refill_seconds = 0.0  # prefills of prompts that took a finished row's place
        self.emitted = 0  # tokens handed to the prompts' outputs so far
        token_progress = progress if token_progress is None else token_progress
        bar = tqdm(total=sum(maxes), desc="generate", unit="tok", disable=not token_progress, leave=False)
        if batch > 1:
            self._done_t = torch.zeros(batch, dtype=torch.bool, device=self.device)
            self._frozen_t = torch.zeros(batch, dtype=torch.long, device=self.device)

        def admit(b: int, j: int) -> None:
            """Prompt j takes row b: its tokens, length, stream and freshly brought-up caches."""
            t0 = time.perf_counter()
            p = prompts[j]
            self.seqs[b, :p.numel()] = p.to(self.device)
            self.lens[b] = p.numel()
            if batch > 1:
                self.lens_t[b] = p.numel()
                self._done_t[b] = False
            self.streams.reseed(b, seeds[j])
            self.jobs[b], self.live[b], done[b] = j, True, False
            for t in every_tier:
                t.cache.rows[b].reset()
            # every row of every tier in use up to its last token (row b: its prompt's prefill; the
            # others a few tokens of catch-up), as at the start: a forward feeds every row the most
            # tokens any row lacks, which a short new prompt must have; tiers switched in later catch up then
            for t in self.tiers:
                self._bring_up(t)
            self.refill_seconds += time.perf_counter() - t0
            self.admit_seconds[j] = time.perf_counter() - self._decode_start

        def on_tokens(starts: list[int]) -> None:
            if batch == 1:
                new = [self.seqs[0, starts[0]:self.lens[0]].tolist()]
            else:  # one copy to the host for all rows
                lo = min(starts)
                block = self.seqs[:, lo:max(self.lens)].tolist()
                new = [block[b][starts[b] - lo:self.lens[b] - lo] for b in range(batch)]
            moved = 0
            for b in range(batch):
                if done[b]:
                    continue
                j = self.jobs[b]
                first = len(outs[j])
                for i, tok in enumerate(new[b]):
                    outs[j].append(tok)
                    if tok in stop_ids or len(outs[j]) >= maxes[j]:
                        done[b], frozen[b] = True, starts[b] + i + 1
                        self.live[b] = False
                        if batch > 1:  # once per row: the rounds that follow hold it there on the device
                            self._done_t[b], self._frozen_t[b] = True, frozen[b]
                        self.finish_seconds[j] = time.perf_counter() - self._decode_start
                        break
                moved += len(outs[j]) - first
                if callback and len(outs[j]) > first:
                    callback(j, outs[j][first:])
            bar.update(moved)
            self.emitted += moved
            for b in range(batch):
                if done[b] and waiting:
                    admit(b, waiting.pop())
            if not all(done):
                self._hold(done, frozen)

        # prefill: the target (and every tier with its own KV) absorbs each prompt but its last token
        self._prefill(progress)
        if chooser is not None:  # measures step costs on first use (reported, not decode time), picks a start
            chooser.start(self)
        self._decode_start = time.perf_counter()
        self._propose(0, max(maxes), on_tokens)
        bar.close()
        return outs

    def _hold(self, done: list[bool], frozen: list[int]) -> None:
        """Roll finished rows back to where they stopped: they keep riding along, masked, without growing."""
        held = [b for b in range(self.batch) if done[b] and self.lens[b] != frozen[b]]
        if not held:
            return
        self.lens_t = torch.where(self._done_t, self._frozen_t, self.lens_t)  # one kernel for every held row
        for b in held:
            self.lens[b] = frozen[b]
            for t in self.tiers:
                t.cache.rows[b].truncate(frozen[b])

    def _prefill(self, progress: bool = False) -> None:
        """Every tier absorbs the prompts but their last tokens; tiers reading the target's KV adopt it."""
        t0 = time.perf_counter()
        for tier in self.tiers:
            self._bring_up(tier, progress)
        if self.sync_timing or self.gpu_timing:
            torch.cuda.synchronize()
        self.prefill_seconds = time.perf_counter() - t0

    def _bring_up(self, tier: Tier, progress: bool = False) -> int:
        """Feed `tier` every token before each row's last one that its caches lack (the prefill, or
        the catch-up of a tier switched in mid-run), row by row. A cache reading the target's KV
        adopts its prefill, and at a catch-up just moves on: every position it lacks is one the
        target has verified and holds, so a forward over them would write nothing it reads (and, as
        the first eager step of its size, could cost a kernel compile: 3.4 s of a 5.2 s run on the
        H200). Returns the tokens fed."""
        fed = 0
        for b, cache in enumerate(tier.cache.rows):
            n = self.lens[b] - 1
            if tier is not self.tiers[0] and (cache.adopt_prefix(n) if cache.length == 0 else cache.catch_up(n)):
                continue
            chunks = range(cache.length, n, self.prefill_chunk)
            desc = f"prefill {tier.name}" + (f" (row {b})" if self.batch > 1 else "")
            for start in tqdm(chunks, desc=desc, disable=not progress or len(chunks) < 8, leave=False):
                end = min(n, start + self.prefill_chunk)
                fed += end - start
                tier.model(self.seqs[b:b + 1, start:end], cache, last=0)
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
