"""Early push's bookkeeping (app/handoff/early_push.py): which blocks are final when, where
they land on decode, and what the final WRITE still moves."""

from __future__ import annotations

from app.handoff.early_push import EarlyPush, EarlyPushBook, PrefillProgress

BS = 4  # tokens per block


def test_progress_reports_a_request_when_its_finished_blocks_grow():
    p = PrefillProgress(BS)
    p.watch("r", prompt_len=18)  # 5 blocks, 3 chunks of 8 tokens (2 blocks each)
    p.scheduled("r", [10, 11], ready=0, new_request=True)
    assert p.take() == {}  # nothing computed before the first chunk
    p.scheduled("r", [12, 13], ready=8, new_request=False)
    assert p.take() == {"r": ((10, 11, 12, 13), 8, 18, False)}
    assert p.take() == {}  # no change, no report
    p.scheduled("r", [14], ready=16, new_request=False)
    assert p.take() == {"r": ((10, 11, 12, 13, 14), 16, 18, False)}


def test_progress_counts_a_partial_block_as_unfinished_and_ignores_unwatched_requests():
    p = PrefillProgress(BS)
    p.watch("r", prompt_len=20)
    p.scheduled("r", [1, 2], ready=6, new_request=True)  # prefix-cache hit of 6 tokens
    assert p.take() == {"r": ((1, 2), 6, 20, False)}  # block 1 (tokens 4-7) is not full yet
    p.scheduled("other", [7], ready=100, new_request=True)
    p.forget("r")
    p.scheduled("r", [3], ready=12, new_request=False)
    assert p.take() == {}


def test_progress_of_a_request_first_seen_mid_prefill_is_not_guessed():
    p = PrefillProgress(BS)
    p.watch("r", prompt_len=40)
    p.scheduled("r", [5], ready=16, new_request=False)  # its first blocks are unknown
    assert p.take() == {}


def _rec(prompt_len=18, blocks=(10, 11, 12, 13, 14), ready=8, finishing=False) -> EarlyPush:
    rec = EarlyPush(BS)
    rec.update((blocks, ready, prompt_len, finishing))
    return rec


def test_early_spans_then_the_remainder_cover_every_block_once():
    rec = _rec(ready=8)
    d = [20, 21, 22, 23, 24]  # decode holds nothing: one decode block per prefill block
    p_ids, d_idx, sent, completes = rec.next_span(len(d))
    assert (p_ids, [d[i] for i in d_idx], sent) == ([10, 11], [20, 21], 2)
    rec.commit(sent, "h1")
    assert rec.next_span(len(d)) is None  # nothing new is ready
    rec.update(((10, 11, 12, 13, 14), 16, 18, False))
    p_ids, d_idx, sent, completes = rec.next_span(len(d))
    assert (p_ids, [d[i] for i in d_idx], sent) == ([12, 13], [22, 23], 4)
    rec.commit(sent, "h2")
    p_rest, d_start = rec.remainder([10, 11, 12, 13, 14], len(d))
    assert (p_rest, d[d_start:]) == ([14], [24])


def test_blocks_decode_already_holds_are_skipped_and_the_tail_aligns():
    rec = _rec(ready=16)
    d = [30, 31, 32]  # decode had the first two blocks cached: it registered the last three
    p_ids, d_idx, sent, completes = rec.next_span(len(d))
    assert (p_ids, [d[i] for i in d_idx], sent) == ([12, 13], [30, 31], 4)
    rec.commit(sent, "h")
    p_rest, d_start = rec.remainder([10, 11, 12, 13, 14], len(d))
    assert (p_rest, d[d_start:]) == ([14], [32])


def test_nothing_is_sent_while_only_cached_blocks_are_ready():
    rec = _rec(ready=8)
    assert rec.next_span(3) is None  # prefill blocks 0-1 map to none of decode's
    assert rec.remainder([10, 11, 12, 13, 14], 3) is None  # the final WRITE moves them all


def test_anything_that_does_not_add_up_sends_every_block_at_the_finish():
    def sent_two():
        rec = _rec(ready=8)
        p_ids, _, sent, _ = rec.next_span(5)
        rec.commit(sent, "h")
        return rec

    assert sent_two().remainder([10, 11, 12, 13], 5) is None  # another block count
    assert sent_two().remainder([10, 99, 12, 13, 14], 5) is None  # blocks moved (preempted)
    assert sent_two().remainder([10, 11, 12, 13, 14], 4) is None  # decode's count changed
    rec = sent_two()
    rec.disabled = True  # an early WRITE failed
    assert rec.remainder([10, 11, 12, 13, 14], 5) is None
    more_decode_than_prefill = _rec(ready=8)
    assert more_decode_than_prefill.next_span(6) is None
    assert more_decode_than_prefill.disabled


def test_the_book_ages_out_records_of_requests_that_never_finished():
    book = EarlyPushBook(BS, max_age_s=0.0)
    book.progress("old", ((1,), 4, 8, False))
    book.progress("new", ((2,), 4, 8, False))  # a new record ages out the stale ones
    assert book.ids() == ["new"]
    book = EarlyPushBook(BS)
    rec = book.progress("r", ((1,), 4, 8, False))
    assert book.progress("r", ((1, 2), 8, 8, False)) is rec and rec.p_blocks == [1, 2]
    assert book.pop("r") is rec and book.get("r") is None


def test_the_last_block_always_waits_for_the_final_write():
    """vLLM's final WRITE carries decode's notification, so it must move at least one block,
    even when the prompt fills its last block exactly and the step has computed it."""
    rec = EarlyPush(BS)
    rec.update(((10, 11, 12, 13), 16, 16, False))  # 16 tokens: 4 full blocks, all computed
    p_ids, d_idx, sent, completes = rec.next_span(4)
    assert (p_ids, d_idx, sent) == ([10, 11, 12], [0, 1, 2], 3)
    rec.commit(sent, "h")
    assert rec.remainder([10, 11, 12, 13], 4) == ([13], 3)


def test_a_finishing_request_is_reported_once_even_without_a_new_full_block():
    """A single-token request (a prefill leg) finishes with the step that computes its
    prompt's last tokens: that step is reported, so its worker can complete the request."""
    p = PrefillProgress(BS)
    p.watch("r", prompt_len=18, single_token=True)
    p.scheduled("r", [10, 11, 12, 13], ready=16, new_request=True)
    assert p.take() == {"r": ((10, 11, 12, 13), 16, 18, False)}
    assert not p.finishing("r")
    p.scheduled("r", [14], ready=18, new_request=False)  # 2 tokens more: no new full block
    assert p.take() == {"r": ((10, 11, 12, 13, 14), 18, 18, True)}
    assert p.finishing("r") and p.take() == {}
    q = PrefillProgress(BS)
    q.watch("r", prompt_len=18)  # generates more than one token: never finishing
    q.scheduled("r", [10, 11, 12, 13, 14], ready=18, new_request=True)
    assert q.take() == {"r": ((10, 11, 12, 13, 14), 18, 18, False)}


def test_completing_early_moves_every_block_left_and_then_nothing():
    rec = _rec(ready=8)
    d = [20, 21, 22, 23, 24]
    p_ids, d_idx, sent, completes = rec.next_span(len(d), complete=True)
    assert (p_ids, sent, completes) == ([10, 11], 2, False)  # not finishing yet
    rec.commit(sent, "h1", completes)
    rec.update(((10, 11, 12, 13, 14), 18, 18, True))
    assert rec.next_span(len(d))[:3] == ([12, 13], [2, 3], 4)  # not completing: last waits
    p_ids, d_idx, sent, completes = rec.next_span(len(d), complete=True)
    assert (p_ids, [d[i] for i in d_idx], sent, completes) == ([12, 13, 14], [22, 23, 24],
                                                                 5, True)
    rec.commit(sent, "h2", completes)
    assert rec.completed and rec.handles == ["h1", "h2"]
    assert rec.next_span(len(d), complete=True) is None


def test_a_one_chunk_prompt_completes_in_one_write_and_a_cached_prefix_is_skipped():
    rec = _rec(ready=18, finishing=True)
    assert rec.next_span(3, complete=True) == ([12, 13, 14], [0, 1, 2], 5, True)
    whole = _rec(ready=18, finishing=True)
    assert whole.next_span(5, complete=True) == ([10, 11, 12, 13, 14], [0, 1, 2, 3, 4], 5,
                                                 True)
