"""Why a migration continues after the last token whose text was sent, shown with vLLM's own
incremental detokenizer and the tiny model's byte-level tokenizer (no engine runs).

" café" tokenizes with "é" as two byte tokens; vLLM holds the first back (empty text). A
peer that continued after that byte would be primed on a prompt ending mid-character, and
vLLM then emits the whole prompt's text as the continuation's first chunk."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.migration import TokenLedger

TINY = Path(__file__).resolve().parents[2] / "models" / "tiny-llama"


@pytest.fixture(scope="module")
def tokenizer():
    from vllm.tokenizers import get_tokenizer

    return get_tokenizer(str(TINY))


def _texts(tokenizer, prompt: list[int], generated: list[int]) -> list[str]:
    """The delta text vLLM's serving layer would send for each generated token."""
    from vllm.sampling_params import RequestOutputKind, SamplingParams
    from vllm.v1.engine import EngineCoreRequest
    from vllm.v1.engine.detokenizer import IncrementalDetokenizer

    request = EngineCoreRequest(
        request_id="r", prompt_token_ids=list(prompt), mm_features=None,
        sampling_params=SamplingParams(max_tokens=64, output_kind=RequestOutputKind.DELTA),
        pooling_params=None, arrival_time=time.time(), lora_request=None, cache_salt=None,
        data_parallel_rank=None)
    detok = IncrementalDetokenizer.from_new_request(tokenizer, request)
    out = []
    for token in generated:
        detok.update([token], False)
        out.append(detok.get_next_output_text(False, True))
    return out


@dataclass
class Out:
    token_ids: list[int]
    text: str


@dataclass
class ReqOut:
    prompt_token_ids: list[int]
    outputs: list[Out]


def test_continuing_after_the_last_whole_text_reproduces_the_stream(tokenizer):
    prompt = tokenizer.encode("hello world", add_special_tokens=False)
    generated = tokenizer.encode(" caf\u00e9 ok", add_special_tokens=False)
    unbroken = _texts(tokenizer, prompt, generated)
    held = unbroken.index("")  # the first byte of "é": its text is held back
    assert unbroken[held + 1] == "\u00e9"

    # The engine dies right after the held byte; the ledger saw what the client saw.
    async def generate(prompt_arg, params, request_id, **kw):
        for token, text in zip(generated[:held + 1], unbroken[:held + 1], strict=True):
            yield ReqOut(prompt, [Out([token], text)])
        raise RuntimeError("EngineDeadError")

    ledger = TokenLedger()

    async def drain():
        try:
            async for _ in ledger.wrap(generate, lambda p: True)("p", None, "r"):
                pass
        except RuntimeError:
            pass

    asyncio.run(drain())
    prompt_ids, sent_ids, whole = ledger.take("r")
    assert sent_ids == generated[:held + 1] and whole == held

    # The peer continues after the tokens whose text was sent: the client's text is whole.
    sent_text = "".join(unbroken[:whole])
    rest = _texts(tokenizer, prompt_ids + sent_ids[:whole], generated[whole:])
    assert sent_text + "".join(rest) == "".join(unbroken)
    # Continuing after every generated token instead primes the detokenizer mid-character:
    # its first chunk is the prompt's own text (what the migration must never send).
    naive = _texts(tokenizer, prompt_ids + sent_ids, generated[held + 1:])
    assert naive[0].startswith("hello world")
