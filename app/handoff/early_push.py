"""Early push: WRITE a chunked prefill's finished KV blocks while later chunks compute.

vLLM's push connector WRITEs a prompt's KV into decode's blocks only once the prefill request
has finished, so the whole copy sits between prefill's last chunk and decode's first step.
With chunked prefill (``max_num_batched_tokens`` below the prompt) a block is final as soon as
the step that computes its last token has run its forward pass. The prefill engine's
scheduler reports, each step, how far each pushed request will have got once the step's
forward pass ends (:class:`PrefillProgress`); its worker, which reads the step's metadata
after that forward pass, WRITEs the newly finished blocks into the decode blocks registered
for them, without a notification (:class:`EarlyPush`). So the earlier chunks move while later
ones compute, and the last chunk's full blocks move while prefill samples token 1 and
finishes the request. vLLM's own WRITE at the finish then moves only the last block and
carries the "KV written" notification, posted after every early WRITE has completed.

*Completing early* (``handoff.push_complete_early``): a prefill leg generates one token, so
the step that computes its prompt's last tokens is the one it finishes with. vLLM learns of
the finish only when it processes that step's output and tells its worker in the *next*
step's metadata (1-3 ms measured on the path). With completing early the worker, reading the
last step's metadata after its forward pass, WRITEs every block not sent yet, the last one
included, with the "KV written" notification at once; vLLM's WRITE at the finish then only
waits for those WRITEs before prefill frees the blocks. This applies to prompts of one chunk
too.

The block mapping follows vLLM's push WRITE: decode allocated blocks only for the tokens it
does not hold (a prefix-cache hit on decode), so its blocks are the tail of prefill's, aligned
at the end. Anything that does not add up at the finish (another block count, blocks that
moved after a preemption, an early WRITE that failed) makes the final WRITE move every block,
as vLLM does without this. The vLLM wiring is app/handoff/early_push_patch.py; nothing here
imports vLLM or Ray.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

# (prefill block ids so far, tokens whose KV is in memory, prompt length, whether the
# request finishes with this step: its whole prompt is in memory and it samples one token)
Progress = tuple[tuple[int, ...], int, int, bool]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class PrefillProgress:
    """Scheduler side: which pushed prefill requests have more finished blocks this step.

    ``watch`` a request when it is admitted; each step, ``scheduled`` it with the block ids
    the scheduler output carries (all of them for a new request, the new ones after) and the
    tokens whose KV is in memory when the worker reads the step's metadata (vLLM's worker
    reads it after the step's forward pass, so those the step computes count too); ``take``
    then gives the requests whose count of finished blocks grew, or that finish with this
    step (a request watched as ``single_token`` whose whole prompt is in memory).
    """

    def __init__(self, block_size: int):
        self.block_size = block_size
        self._reqs: dict[str, dict[str, Any]] = {}

    def watch(self, req_id: str, prompt_len: int, single_token: bool = False) -> None:
        self._reqs[req_id] = {"prompt_len": prompt_len, "blocks": None, "ready": 0,
                              "reported": 0, "single_token": single_token, "final": False}

    def forget(self, req_id: str) -> None:
        self._reqs.pop(req_id, None)

    def __contains__(self, req_id: str) -> bool:
        return req_id in self._reqs

    def scheduled(self, req_id: str, block_ids: list[int] | None, ready: int,
                  new_request: bool) -> None:
        r = self._reqs.get(req_id)
        if r is None:
            return
        if new_request:
            r["blocks"] = list(block_ids or [])
        elif r["blocks"] is None:  # never seen as new (watched late): nothing to add to
            return
        elif block_ids:
            r["blocks"].extend(block_ids)
        r["ready"] = ready

    def take(self) -> dict[str, Progress]:
        out: dict[str, Progress] = {}
        for req_id, r in self._reqs.items():
            if r["blocks"] is None:
                continue
            full = min(r["ready"] // self.block_size, len(r["blocks"]))
            final = r["single_token"] and r["ready"] >= r["prompt_len"] and \
                len(r["blocks"]) >= cdiv(r["prompt_len"], self.block_size)
            if full > r["reported"] or (final and not r["final"]):
                r["reported"], r["final"] = full, final
                out[req_id] = (tuple(r["blocks"]), r["ready"], r["prompt_len"], final)
        return out

    def finishing(self, req_id: str) -> bool:
        """Whether ``req_id`` was reported as finishing (its worker may have completed it)."""
        r = self._reqs.get(req_id)
        return bool(r and r["final"])


@dataclass
class EarlyPush:
    """Worker side: one pushed request's early WRITEs (posted from the push writer thread)."""

    block_size: int
    prompt_len: int = 0
    p_blocks: list[int] = field(default_factory=list)
    ready_tokens: int = 0
    finishing: bool = False  # the request finishes with the step that reported this
    completed: bool = False  # every block is WRITTEN, the notification with the last ones
    sent: int = 0  # prefill blocks [0, sent) are WRITTEN (or held by decode already)
    offset: int | None = None  # prefill block i is decode block i - offset
    handles: list[Any] = field(default_factory=list)
    disabled: bool = False
    created: float = field(default_factory=time.monotonic)

    def update(self, progress: Progress) -> None:
        blocks, ready, prompt_len, finishing = progress
        self.p_blocks, self.ready_tokens, self.prompt_len = list(blocks), ready, prompt_len
        self.finishing = finishing

    def next_span(self, n_decode_blocks: int, complete: bool = False
                  ) -> tuple[list[int], list[int], int, bool] | None:
        """(prefill block ids, decode block indexes, new ``sent``, whether this WRITE
        completes the request) to WRITE now, or None.

        The decode indexes are relative to decode's registered list. With ``complete`` and a
        finishing request, the span runs to the last block and the WRITE must carry the
        "KV written" notification; otherwise the last block waits for vLLM's final WRITE."""
        if self.disabled or self.completed or not self.prompt_len:
            return None
        offset = cdiv(self.prompt_len, self.block_size) - n_decode_blocks
        if offset < 0 or (self.offset is not None and offset != self.offset):
            self.disabled = True
            return None
        self.offset = offset
        n_blocks = cdiv(self.prompt_len, self.block_size)
        start = max(self.sent, offset)
        if complete and self.finishing and len(self.p_blocks) == n_blocks \
                and start < n_blocks:
            return (self.p_blocks[start:], list(range(start - offset, n_blocks - offset)),
                    n_blocks, True)
        # the last block waits for vLLM's final WRITE, which carries the notification
        ready = min(self.ready_tokens // self.block_size, len(self.p_blocks), n_blocks - 1)
        if ready <= start:
            return None
        return (self.p_blocks[start:ready], list(range(start - offset, ready - offset)), ready,
                False)

    def commit(self, sent: int, handle: Any, completes: bool = False) -> None:
        self.sent = sent
        self.handles.append(handle)
        self.completed = completes

    def remainder(self, final_p_blocks: list[int], n_decode_blocks: int
                  ) -> tuple[list[int], int] | None:
        """What the final WRITE moves: (prefill blocks not sent, first decode index), or None
        when it must move them all (nothing was sent early, or the blocks do not add up)."""
        if self.disabled or self.offset is None or self.sent <= self.offset:
            return None
        if (len(final_p_blocks) != cdiv(self.prompt_len, self.block_size)
                or len(final_p_blocks) - n_decode_blocks != self.offset
                or final_p_blocks[:self.sent] != self.p_blocks[:self.sent]
                or self.sent >= len(final_p_blocks)):
            return None
        return final_p_blocks[self.sent:], self.sent - self.offset


class EarlyPushBook:
    """A worker's :class:`EarlyPush` records by prefill request id; stale ones age out (a
    request whose decode leg never registered and whose blocks the lease freed)."""

    def __init__(self, block_size: int, max_age_s: float = 600.0):
        self.block_size, self.max_age_s = block_size, max_age_s
        self._by_id: dict[str, EarlyPush] = {}

    def progress(self, req_id: str, progress: Progress) -> EarlyPush:
        rec = self._by_id.get(req_id)
        if rec is None:
            self._age_out()
            rec = self._by_id[req_id] = EarlyPush(self.block_size)
        rec.update(progress)
        return rec

    def get(self, req_id: str) -> EarlyPush | None:
        return self._by_id.get(req_id)

    def pop(self, req_id: str) -> EarlyPush | None:
        return self._by_id.pop(req_id, None)

    def ids(self) -> list[str]:
        return list(self._by_id)

    def _age_out(self) -> None:
        limit = time.monotonic() - self.max_age_s
        for req_id in [k for k, r in self._by_id.items() if r.created < limit]:
            del self._by_id[req_id]
