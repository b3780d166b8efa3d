"""vLLM-like engine replicas: continuous batching with step times from the capacity profile.

Three kinds, one per role:

- :class:`PrefillReplica`: each step packs queued prompts FCFS into at most
  ``max_num_batched_tokens`` prompt tokens and ``max_num_seqs`` prompts (a long prompt is
  chunked over several steps); the step takes ``profile.pd_prefill_ms(the step's chunks,
  decode busy share)``: the lone-prompt latency at the step's tokens, cheaper for several
  short prompts and dearer for a long prompt's later chunks (``Profile.prefill_step_ms``),
  slowed while decode shares the host if the profile measured that.
- :class:`DecodeReplica`: admits handed-off sequences FCFS while it holds fewer than
  ``max_num_seqs`` and their KV fits ``kv.capacity_tokens``; every step produces one token for
  every running sequence in ``profile.pd_itl_ms(batch, mean context, prefill busy share)``
  (``itl_ms`` unless the profile measured how a busy prefill engine on the same host slows
  decoding).
- :class:`AggregatedReplica`: both in one engine as vLLM's chunked prefill does: decodes take
  one token of the step's budget each, prompt chunks the rest.

Admission reserves a sequence's final KV (prompt + output). vLLM allocates blocks as tokens
come and preempts (recomputes) when it runs out; reserving keeps the model free of preemption
storms at the price of admitting slightly fewer sequences near a full cache.

Per step the cost is O(1) plus the sequences that start or finish in it: a sequence admitted
at step ``s`` yields its first token at the end of ``s`` and its last at the end of
``s + output - 1``, so finishes are popped from a heap of step numbers, never scanned.

Life cycle: ``starting`` (costs replica time, serves nothing) → ``running`` → ``draining``
(takes no new work, finishes what it holds) → ``stopped``.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable

from autoscaling.profile_model import Profile
from autoscaling.sim.events import EventLoop
from autoscaling.sim.telemetry import ReplicaTelemetry
from autoscaling.sim.workload import SimRequest

STARTING, RUNNING, DRAINING, STOPPED = "starting", "running", "draining", "stopped"

Callback = Callable[[SimRequest], None]


def _ignore(_: SimRequest) -> None:
    pass


class Replica:
    """What every engine replica shares: life cycle, counters, telemetry."""

    kind = "replica"

    def __init__(self, rid: str, profile: Profile, loop: EventLoop, look_back_s: float):
        self.id, self.profile, self.loop = rid, profile, loop
        self.state = STARTING
        self.requested_t = loop.now
        self.ready_t: float | None = None
        self.stopped_t: float | None = None
        self.busy = False
        self.prompt_tokens_computed = 0
        self.generation_tokens = 0
        self.kv_tokens = 0  # KV held now (prompt + generated of running sequences)
        self.queued_tokens = 0  # prompt tokens accepted, not yet computed
        self.telemetry = ReplicaTelemetry(lambda: loop.now, look_back_s)
        self.on_stopped: Callable[[Replica], None] | None = None

    # --- what subclasses answer ----------------------------------------------------------

    def ongoing(self) -> int:
        """Requests assigned here and not finished here (Ray's ongoing requests)."""
        raise NotImplementedError

    def running_waiting(self) -> tuple[int, int]:
        raise NotImplementedError

    def _has_work(self) -> bool:
        raise NotImplementedError

    def _step(self) -> None:
        raise NotImplementedError

    # --- shared -------------------------------------------------------------------------

    def routing_load(self) -> tuple[float, float]:
        return (self.ongoing(), self.queued_tokens)

    def engine_counters(self) -> dict[str, float]:
        """The fields of ``app.engine_stats.EngineCounters`` that the signals read."""
        running, waiting = self.running_waiting()
        return {
            "num_running_reqs": running, "num_waiting_reqs": waiting,
            "kv_cache_usage": self.kv_tokens / self.profile.kv.capacity_tokens,
            "kv_num_blocks": self.profile.kv.capacity_tokens, "kv_block_size": 1,
            "prompt_tokens_computed": self.prompt_tokens_computed,
            "generation_tokens": self.generation_tokens,
        }

    def record_signals(self) -> dict[str, float]:
        return self.telemetry.record(self.engine_counters(), self.queued_tokens, self.ongoing())

    def become_ready(self) -> None:
        if self.state == STARTING:
            self.state, self.ready_t = RUNNING, self.loop.now
            self._kick()

    def drain(self) -> None:
        """Stop taking work; stop once what is held is done (at once when idle). A replica
        still starting is simply cancelled."""
        if self.state in (STARTING, RUNNING):
            self.state = DRAINING
            self._maybe_stop()

    def _kick(self) -> None:
        """New work for an idle engine: start a step (after the events of this instant, so
        simultaneous arrivals share it)."""
        if not self.busy and self.state in (RUNNING, DRAINING) and self._has_work():
            self.busy = True
            self.loop.after(0.0, self._step)

    def _idle(self) -> None:
        """End of a step: the next one starts at once while there is work."""
        if self._has_work():
            self._step()
        else:
            self._stand_by()

    def _stand_by(self) -> None:
        self.busy = False
        self._maybe_stop()

    def _maybe_stop(self) -> None:
        if self.state == DRAINING and not self.busy and self.ongoing() == 0:
            self.state, self.stopped_t = STOPPED, self.loop.now
            if self.on_stopped is not None:
                self.on_stopped(self)


class PrefillReplica(Replica):
    """Computes prompts; ``on_prefilled(req)`` hands each finished one over (KV transfer)."""

    kind = "prefill"

    def __init__(self, rid: str, profile: Profile, loop: EventLoop, look_back_s: float,
                 on_prefilled: Callback = _ignore,
                 decode_busy: Callable[[], float] = lambda: 0.0):
        super().__init__(rid, profile, loop, look_back_s)
        self.on_prefilled = on_prefilled
        self.decode_busy = decode_busy  # share of decode engines decoding (host sharing)
        self.queue: deque[list] = deque()  # [request, prompt tokens left]
        self.in_step = 0

    def ongoing(self) -> int:
        return len(self.queue)

    def running_waiting(self) -> tuple[int, int]:
        return self.in_step, len(self.queue) - self.in_step

    def _has_work(self) -> bool:
        return bool(self.queue)

    def enqueue(self, req: SimRequest) -> None:
        self.queue.append([req, req.prompt])
        self.queued_tokens += req.prompt
        self.telemetry.observe_arrival(req.prompt)
        self._kick()

    def _step(self) -> None:
        p = self.profile
        budget, batch, tokens = p.max_num_batched_tokens, [], 0
        for item in self.queue:
            if budget <= 0 or len(batch) >= p.max_num_seqs:
                break
            take = min(item[1], budget)
            batch.append((item, take))
            budget -= take
            tokens += take
        self.in_step = len(batch)
        ms = p.pd_prefill_ms(_chunks(batch), self.decode_busy())
        self.loop.after(ms / 1e3, self._end_step, batch, tokens)

    def _end_step(self, batch: list, tokens: int) -> None:
        now = self.loop.now
        for item, take in batch:
            item[1] -= take
        self.queued_tokens -= tokens
        self.prompt_tokens_computed += tokens
        self.in_step = 0
        # Finished prompts are a prefix of the queue (only the batch's last may be partial).
        while self.queue and self.queue[0][1] <= 0:
            req = self.queue.popleft()[0]
            req.prefill_done_t = now
            self.telemetry.observe_ttft(now - req.arrival)
            self.on_prefilled(req)
        self._idle()


class _Decoding(Replica):
    """Running-sequence bookkeeping shared by decode and aggregated replicas."""

    def __init__(self, rid: str, profile: Profile, loop: EventLoop, look_back_s: float,
                 on_finished: Callback = _ignore):
        super().__init__(rid, profile, loop, look_back_s)
        self.on_finished = on_finished
        self.running = 0
        self.kv_reserved = 0
        self.step_no = 0
        self._finish: list[tuple[int, int, SimRequest]] = []

    def _fits(self, req: SimRequest, extra_seqs: int = 0) -> bool:
        p = self.profile
        if self.running + extra_seqs >= p.max_num_seqs:
            return False
        if self.running + extra_seqs == 0:  # alone it must run, even if it cannot fit
            return True
        return self.kv_reserved + req.prompt + req.output <= p.kv.capacity_tokens

    def _start_decoding(self, req: SimRequest, first_token_step: int, kv_now: int) -> None:
        heapq.heappush(self._finish, (first_token_step + req.output - 1, req.id, req))
        self.running += 1
        self.kv_tokens += kv_now

    def _advance(self, step_ms: float, decoding: int, first_tokens: int) -> None:
        """End of a step: ``decoding`` sequences each made a token, ``first_tokens`` of them
        their first (not an inter-token gap); pop those that are done."""
        now = self.loop.now
        self.step_no += 1
        self.generation_tokens += decoding
        self.kv_tokens += decoding
        self.telemetry.observe_itl_step(step_ms, decoding - first_tokens)
        fin = self._finish
        while fin and fin[0][0] <= self.step_no:
            req = heapq.heappop(fin)[2]
            req.finished_t = now
            self.running -= 1
            self.kv_tokens -= req.prompt + req.output
            self.kv_reserved -= req.prompt + req.output
            self._release(req)
            self.on_finished(req)

    def _release(self, req: SimRequest) -> None:
        pass


class DecodeReplica(_Decoding):
    """Generates tokens for sequences whose KV was handed over by a prefill replica. It is
    also the request's ingress (as in this app), so a request counts as ongoing here from
    routing (before its prefill) to its last token."""

    kind = "decode"

    def __init__(self, rid: str, profile: Profile, loop: EventLoop, look_back_s: float,
                 on_finished: Callback = _ignore,
                 prefill_busy: Callable[[], float] = lambda: 0.0):
        super().__init__(rid, profile, loop, look_back_s, on_finished)
        self.prefill_busy = prefill_busy  # share of prefill engines computing (host sharing)
        self.assigned = 0  # routed here, not finished
        self.incoming = 0  # prefilled elsewhere, KV in flight (the engine holds the request)
        self.waiting: deque[SimRequest] = deque()

    def ongoing(self) -> int:
        return self.assigned

    def routing_load(self) -> tuple[float, float]:
        return (self.assigned, self.kv_tokens)

    def running_waiting(self) -> tuple[int, int]:
        # vLLM counts a request waiting for its remote KV as waiting.
        return self.running, len(self.waiting) + self.incoming

    def _has_work(self) -> bool:
        return self.running > 0 or bool(self.waiting)

    def assign(self, req: SimRequest) -> None:
        """Routed here on arrival: this replica (the ingress) now holds the request, but its
        engine sees it only once the prefill is done (:meth:`kv_incoming`)."""
        self.assigned += 1

    def kv_incoming(self, req: SimRequest) -> None:
        """The prefill is done: the request enters the engine, waiting for its remote KV."""
        self.incoming += 1

    def kv_arrived(self, req: SimRequest) -> None:
        self.incoming -= 1
        self.waiting.append(req)
        self._kick()

    def _step(self) -> None:
        admitted = []
        nxt = self.step_no + 1
        while self.waiting and self._fits(self.waiting[0]):
            req = self.waiting.popleft()
            self.kv_reserved += req.prompt + req.output
            self._start_decoding(req, nxt, req.prompt)
            admitted.append(req)
        if not self.running:
            self._stand_by()
            return
        ms = self.profile.pd_itl_ms(self.running, self.kv_tokens / self.running,
                                    self.prefill_busy())
        self.loop.after(ms / 1e3, self._end_step, admitted, ms)

    def _end_step(self, admitted: list[SimRequest], ms: float) -> None:
        now = self.loop.now
        for req in admitted:
            req.first_token_t = now
            self.telemetry.observe_ttft(now - req.prefill_done_t)
        self._advance(ms, self.running, len(admitted))
        self._idle()

    def _release(self, req: SimRequest) -> None:
        self.assigned -= 1


def _chunks(batch: list) -> list[tuple[float, float]]:
    """A step's prompt chunks for ``Profile.prefill_step_ms``: (tokens taken now, tokens of
    that prompt computed before), from ``(item, take)`` pairs of [request, tokens left]."""
    return [(take, item[0].prompt - item[1]) for item, take in batch]


def mixed_step_ms(profile: Profile, prefill_tokens: int, decode_batch: int,
                  mean_context: float, chunks: list[tuple[float, float]] | None = None
                  ) -> float:
    """One chunked-prefill step: the prompt chunks' time plus the decode batch's, sharing
    one pass over the weights (the smaller of the two single-sequence costs is paid once).
    ``chunks``: the prompt chunks as in ``Profile.prefill_step_ms`` (default: one fresh
    prompt of ``prefill_tokens``)."""
    if prefill_tokens <= 0:
        return profile.itl_ms(decode_batch, mean_context)
    pre = profile.prefill_step_ms(chunks or [(prefill_tokens, 0)])
    if decode_batch <= 0:
        return pre
    dec = profile.itl_ms(decode_batch, mean_context)
    shared = min(profile.itl_ms(1, 1), pre, dec)
    return max(pre + dec - shared, pre, dec)


class AggregatedReplica(_Decoding):
    """Prefill and decode in one engine (vLLM's chunked prefill): each step, running decodes
    take one token of ``max_num_batched_tokens`` each, admitted prompts fill the rest."""

    kind = "aggregated"

    def __init__(self, rid: str, profile: Profile, loop: EventLoop, look_back_s: float,
                 on_finished: Callback = _ignore):
        super().__init__(rid, profile, loop, look_back_s, on_finished)
        self.waiting: deque[SimRequest] = deque()
        self.prefilling: deque[list] = deque()  # [request, prompt tokens left]
        self.in_step = 0

    def ongoing(self) -> int:
        return len(self.waiting) + len(self.prefilling) + self.running

    def running_waiting(self) -> tuple[int, int]:
        return self.running + self.in_step, len(self.waiting) + len(self.prefilling) - \
            self.in_step

    def _has_work(self) -> bool:
        return self.running > 0 or bool(self.waiting) or bool(self.prefilling)

    def enqueue(self, req: SimRequest) -> None:
        self.waiting.append(req)
        self.queued_tokens += req.prompt
        self.telemetry.observe_arrival(req.prompt)
        self._kick()

    def _step(self) -> None:
        p = self.profile
        while self.waiting and self._fits(self.waiting[0], len(self.prefilling)):
            req = self.waiting.popleft()
            self.kv_reserved += req.prompt + req.output
            self.prefilling.append([req, req.prompt])
        decoding = self.running
        budget = p.max_num_batched_tokens - decoding
        batch, tokens = [], 0
        for item in self.prefilling:
            if budget <= 0:
                break
            take = min(item[1], budget)
            batch.append((item, take))
            budget -= take
            tokens += take
        if not decoding and not tokens:
            self._stand_by()
            return
        self.in_step = len(batch)
        ctx = self.kv_tokens / decoding if decoding else 0.0
        ms = mixed_step_ms(p, tokens, decoding, ctx, _chunks(batch))
        self.loop.after(ms / 1e3, self._end_step, batch, tokens, decoding, ms)

    def _end_step(self, batch: list, tokens: int, decoding: int, ms: float) -> None:
        now = self.loop.now
        self._advance(ms, decoding, 0)
        for item, take in batch:
            item[1] -= take
        self.queued_tokens -= tokens
        self.prompt_tokens_computed += tokens
        self.kv_tokens += tokens
        self.in_step = 0
        while self.prefilling and self.prefilling[0][1] <= 0:
            req = self.prefilling.popleft()[0]
            req.prefill_done_t = req.first_token_t = now
            self.telemetry.observe_ttft(now - req.arrival)
            self.generation_tokens += 1
            self.kv_tokens -= req.prompt  # _start_decoding adds the sequence's KV back
            if req.output <= 1:
                req.finished_t = now
                self.kv_reserved -= req.prompt + req.output
                self.on_finished(req)
            else:
                self._start_decoding(req, self.step_no, req.prompt + 1)
        self._idle()
