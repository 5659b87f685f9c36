"""CUDA-graph capture of decode and verify steps.

At small batch a decode step is a few hundred small kernels; launching them from Python costs
more than the bytes they read for a 4K-token draft cache. A graph replays them with one launch.
Shapes are static per (tier, tokens per step, rows kept); the caches read their lengths from
device scalars refreshed by `cache.prepare` before each replay, so no host sync is needed.
Prefill chunks and odd step sizes run eagerly; so do re-selection steps, except a selection the
cache can make on the device (retrieval): that step runs the graph-mode code uncaptured, for
every row of a batch at once.

A capture that fails (no memory for the graph pool, a capture invalidated by a forbidden call,
any CUDA or Triton error while capturing) is ended and cleaned up, and that step shape runs the
same graph-mode code eagerly from then on: the same kernels and numerics, so the same output,
only with the launch overhead the graph would have saved. One warning per `GraphedModel`.
Python's cyclic garbage collector is paused and every existing object frozen during a capture:
a collection there can destroy dead graphs held by reference cycles, and their
`cudaGraphExecDestroy` is forbidden while a stream captures (the capture is invalidated; this
is what killed a benchmark that built many engines, each in a cycle with its captured graphs).

Under tensor parallelism the graphs contain the model's NCCL all-reduces: a blocking
`dist.all_reduce` is issued on the current (capturing) stream in recent PyTorch (pytorch#150398;
older versions join NCCL's own stream by events, which capture too), and the eager prefill has
created the communicator before the first capture. The engine's decision broadcasts stay outside.
"""
from __future__ import annotations

import gc
import time
import warnings

import torch

from triforce.cache import KVCache
from triforce.models.llama import ModelArgs, Transformer
from triforce.sampling import RowStreams, process_logits, sample

SPLIT_K_PROGRAMS = 2 * 160  # upper bound on the split-K kernel's programs (2 waves of a GPU's SMs)
POOL_SEGMENT = 20 * 2 ** 20  # the caching allocator grows a pool by segments of up to this size


def graph_memory(args: ModelArgs, sizes: set[int], dtype_bytes: int, batch: int = 1) -> int:
    """Bytes the graph pool of one tier may hold for steps of `sizes` tokens of `batch` rows (an upper bound).

    Per graph: the float32 logits and the sampling head's copies of them (softmax, the top-p
    sort's values and indices, the scattered result), the step's activations (residual, norms,
    fused q/k/v, gate/up, SwiGLU) and the split-K attention's partial outputs; plus one segment
    of allocator granularity per pool. Graphs of a tier share one pool, but each keeps its own
    outputs alive, so the sum over the sizes is what the planner counts.
    """
    width = 4 * args.dim + 3 * args.intermediate_size + (args.n_heads + 2 * args.n_kv_heads) * args.head_dim
    group = args.n_heads // args.n_kv_heads
    total = POOL_SEGMENT
    for t in sizes:
        t *= batch
        logits = t * args.vocab_size * (4 * 4 + 8)  # logits, probs, sorted, result (float32) + sort indices
        activations = 2 * t * width * dtype_bytes
        split_k = SPLIT_K_PROGRAMS * group * t * (args.head_dim + 1) * 4
        total += logits + activations + split_k
    return total


def _available_bytes() -> int:
    """Device memory a new graph pool can still get: free memory, capped by the allocator's
    per-process limit (`set_per_process_memory_fraction`) minus what PyTorch already reserved."""
    free, total = torch.cuda.mem_get_info()
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda: 1.0)()
    return int(min(free, fraction * total - torch.cuda.memory_reserved()))


def _clear_device_error(device: torch.device) -> None:
    """Wait for the device and make sure no stale error of a failed capture is left for the next
    launch to report. A first failing probe consumes such an error; a second means the context
    is broken (a sticky error), and then nothing can run: raise."""
    for attempt in range(2):
        try:
            torch.cuda.synchronize(device)
            torch.zeros(1, device=device).add_(1)
            torch.cuda.synchronize(device)
            return
        except RuntimeError:
            if attempt:
                raise


class GraphedModel:
    """`model(tokens, cache, last)` through one CUDA graph per (T, last), captured on first use.

    `distributions` also captures what a tier does with the logits (temperature, top-p and, for
    the drafting tier, the draw of the next token), so a draft step costs the host a handful of
    launches instead of a few dozen.
    """

    def __init__(self, model: Transformer, cache: KVCache, sizes: set[int], warmup: int = 2, capture: bool = True):
        """`capture=False` runs the graph-mode code eagerly (device-side lengths, static shapes):
        how the CPU tests check the captured path's semantics, and what a step whose capture
        failed runs."""
        self.model, self.cache, self.sizes, self.warmup, self.capture = model, cache, sizes, warmup, capture
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, tuple]] = {}
        self.failed: set[tuple] = set()  # keys whose capture failed: eager from then on, never retried
        self.warned = False
        self.capture_seconds, self.captures = 0.0, 0  # wall time of the captures (warm-up and compiles included)
        self.tried_sizes: set[int] = set()  # step sizes captured or tried (what a new configuration need not pay)
        self.pool = None  # one memory pool shared by this model's graphs (a handle, so cleanup can name it)
        self.batch = len(cache.rows)  # rows of each step (a `Rows` cache serves a batch)
        self.uniform = torch.zeros(self.batch, model.args.vocab_size, device=model.device)  # noise of in-graph draws

    def usable(self, n_new: int, last: int) -> bool:
        return n_new in self.sizes and (self.cache.can_replay(n_new) or self.cache.can_select_in_graph_mode())

    def _capture(self, n_new: int, last: int, head):
        """Warm up (compiles every Triton kernel and torch.compile'd piece outside the capture),
        check there is memory for the pool, then capture one step. Raises after cleaning up."""
        tokens = torch.zeros(self.batch, n_new, dtype=torch.long, device=self.model.device)
        cache = self.cache
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        cache.graph_mode = True
        try:
            with torch.cuda.stream(side):  # warm-up writes only speculative positions, rewritten later
                for _ in range(self.warmup):
                    head(self.model(tokens, cache, last=last))
            torch.cuda.current_stream().wait_stream(side)
            self._check_memory(n_new)
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            collecting = gc.isenabled()
            gc.disable()
            gc.freeze()  # nothing that exists now is collected during the capture, even by an explicit gc.collect()
            try:
                with torch.cuda.stream(side):
                    capturing = False
                    try:
                        graph.capture_begin(pool=self.pool)
                        capturing = True
                        out = head(self.model(tokens, cache, last=last))
                        capturing = False
                        graph.capture_end()
                    except BaseException:
                        self._abandon(graph, capturing)
                        raise
            finally:
                gc.unfreeze()
                if collecting:
                    gc.enable()
        finally:
            cache.graph_mode = False
        return graph, tokens, out

    def _check_memory(self, n_new: int) -> None:
        """Fail before capturing (not inside it) when the pool cannot grow by this step's estimate.

        As torch.cuda.graph does, cached blocks of other pools go back to the driver first; dead
        reference cycles may still hold old graphs' pools, so collect them when short."""
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        args = self.model.local_args
        need = graph_memory(args, {n_new}, self.model.dtype.itemsize, self.batch)
        if _available_bytes() < need:
            gc.collect()
            torch.cuda.empty_cache()
        available = _available_bytes()
        if available < need:
            raise torch.OutOfMemoryError(f"a graph of a {n_new}-token step needs about {need / 2**20:.0f} MiB "
                                         f"for its pool but {max(0, available) / 2**20:.0f} MiB is free")

    def _abandon(self, graph: torch.cuda.CUDAGraph, capturing: bool) -> None:
        """Leave the device usable after a failed capture: end the capture (`capturing`: the
        failure came before capture_end), stop the allocator routing this stream to the pool, give
        the pool back the reference the graph took, drop the graph. A step the failure already
        did is skipped (capture_end raises for an invalidated capture before it detaches the pool)."""
        device = torch.cuda.current_device()
        if capturing:
            try:
                graph.capture_end()
            except RuntimeError:
                pass  # an invalidated capture: cudaStreamEndCapture has ended it all the same
        try:
            torch._C._cuda_endAllocateToPool(device, self.pool)
        except RuntimeError:
            pass  # capture_end got as far as detaching it
        try:
            graph.pool()  # succeeds once capture_end completed: then reset() releases the pool itself
        except RuntimeError:
            try:
                torch._C._cuda_releasePool(device, self.pool)
            except RuntimeError:
                pass  # capture_begin failed before the pool was created
        graph.reset()

    def _give_up(self, key: tuple, error: BaseException) -> None:
        """Record a failed capture (that shape runs eagerly from now on) and warn once."""
        self.failed.add(key)
        if self.model.device.type == "cuda":
            _clear_device_error(self.model.device)
        if not self.warned:
            self.warned = True
            warnings.warn(f"CUDA-graph capture of a {key[0]}-token step over a {type(self.cache).__name__} failed "
                          f"({type(error).__name__}: "
                          f"{str(error).strip()[:300]}); that step shape now runs the same code eagerly (same "
                          f"output, more launch overhead) and is not captured again. Later capture failures "
                          f"of this tier are not reported.", RuntimeWarning, stacklevel=2)

    def _run(self, tokens: torch.Tensor, last: int, head, head_key: tuple) -> tuple:
        n_new = tokens.shape[1]
        selecting = self.cache.can_select_in_graph_mode()  # a one-off selection step: graph-mode code, not captured
        if selecting:
            self.cache.begin_selection()
        self.cache.prepare(n_new)
        key = (n_new, last, head_key, self.cache.graph_key())
        if selecting:
            key = None
        elif self.capture and key not in self.graphs and key not in self.failed:
            t0 = time.perf_counter()
            try:
                self.graphs[key] = self._capture(n_new, last, head)
            except Exception as e:  # whatever broke the capture, the eager graph-mode step below still runs
                self._give_up(key, e)
            self.cache.prepare(n_new)
            self.capture_seconds += time.perf_counter() - t0
            self.captures += 1
            self.tried_sizes.add(n_new)
        if key not in self.graphs:
            self.cache.graph_mode = True
            try:
                out = head(self.model(tokens, self.cache, last=last))
            finally:
                self.cache.graph_mode = False
            self.cache.advance(n_new)
            return out
        graph, static_tokens, out = self.graphs[key]
        static_tokens.copy_(tokens)
        graph.replay()
        self.cache.advance(n_new)
        return out

    def __call__(self, tokens: torch.Tensor, last: int) -> torch.Tensor:
        """Logits [1, last, V] (float32), as `model(tokens, cache, last=last)`."""
        return self._run(tokens, last, lambda logits: (logits,), ())[0]

    def distributions(self, tokens: torch.Tensor, last: int, temperature: float, top_p: float,
                      streams: RowStreams | None = None, live: list[bool] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Processed distributions [B, last, V] (a copy) and, with the rows' random streams, a token
        [B] drawn from each row's last position (the graph's own buffer: copy it before the next replay).

        The uniforms of the draw come from the rows' streams outside the graph (one launch for all
        rows), exactly as the eager path draws them, so graphed and eager steps sample the same tokens.
        """
        draw = streams is not None
        if draw:
            streams.uniform(self.uniform.shape[1], live, out=self.uniform)

        def head(logits):
            p = process_logits(logits.flatten(0, 1), temperature, top_p).view(logits.shape)
            return p, (sample(p[:, -1], uniform=self.uniform) if draw else None)
        p, token = self._run(tokens, last, head, (temperature, top_p, draw))
        return p.clone(), token  # p outlives the next replay (a verifier compares against it)


def graph_sizes(tiers: list, level: int) -> set[int]:
    """Step sizes worth a graph for tier `level` of an engine's `tiers`.

    A verifier feeds its gamma drafts after the token the round before appended (gamma + 1), or
    one more when that round's last token came from above and it never saw it (gamma + 2). The
    drafting tier decodes one token, or catches up on the corrections of the rounds above (2-3).
    Anything else (prefill chunks, rarer catch-ups) runs eagerly.
    """
    if level == len(tiers) - 1:
        return {1, 2, 3}
    return {tiers[level].gamma + 1, tiers[level].gamma + 2}
