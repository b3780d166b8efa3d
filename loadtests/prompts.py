"""Token-level prompt synthesis.

Prompts are lists of token ids, so their lengths are exact (no tokenizer round trip can merge
or split anything) and prefix sharing is exact: a shared prefix is the same token ids.
Everything is seeded; the same seed gives the same prompts on any machine.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

ID_DIGITS = 3  # leading tokens of a block that spell its hash id (see block_tokens)


@dataclass(frozen=True)
class TokenSpace:
    """Token ids ``lo <= id < hi`` that prompts are drawn from.

    Defaults derived from a vocabulary skip its first and last 5 % where tokenizers usually
    keep special tokens; any id below the vocabulary size is valid for the server.
    """

    lo: int
    hi: int

    def __post_init__(self) -> None:
        if not 0 <= self.lo < self.hi:
            raise ValueError(f"bad token range {self.lo}:{self.hi}")

    @property
    def size(self) -> int:
        return self.hi - self.lo

    @classmethod
    def for_vocab(cls, vocab_size: int) -> TokenSpace:
        margin = vocab_size // 20
        lo, hi = max(1, margin), vocab_size - margin
        if hi <= lo:
            lo, hi = 0, vocab_size
        return cls(lo, hi)

    @classmethod
    def parse(cls, text: str) -> TokenSpace:
        lo, _, hi = text.partition(":")
        return cls(int(lo), int(hi))


def random_tokens(rng: random.Random, n: int, space: TokenSpace) -> list[int]:
    """``n`` ids drawn uniformly from ``space``."""
    return [space.lo + int(rng.random() * space.size) for _ in range(n)]


def block_tokens(hash_id: int, block_size: int, space: TokenSpace, seed: int | str) -> list[int]:
    """The token block for one Mooncake ``hash_id``.

    A pure function of ``(hash_id, seed)``, so equal ids give identical blocks wherever they
    appear. The first ``min(block_size, 3)`` tokens spell the id in base ``space.size``, which
    makes distinct ids give distinct blocks by construction (not just with high probability)
    for ids below ``space.size ** min(block_size, 3)``; the rest is seeded noise.
    """
    if hash_id < 0:
        raise ValueError("hash ids are non-negative")
    digits: list[int] = []
    value = hash_id
    for _ in range(min(block_size, ID_DIGITS)):
        value, digit = divmod(value, space.size)
        digits.append(space.lo + digit)
    rng = random.Random(f"loadtests-block:{seed}:{hash_id}")
    return digits + random_tokens(rng, block_size - len(digits), space)


@dataclass
class BlockCache:
    """Memoises :func:`block_tokens` for one replay (ids repeat a lot in Mooncake traces)."""

    block_size: int
    space: TokenSpace
    seed: int | str
    _blocks: dict[int, list[int]] = field(default_factory=dict)

    def get(self, hash_id: int) -> list[int]:
        block = self._blocks.get(hash_id)
        if block is None:
            block = block_tokens(hash_id, self.block_size, self.space, self.seed)
            self._blocks[hash_id] = block
        return block


def scaled_block_length(input_len: int, n_blocks: int, block: int, trace_block: int) -> int:
    """Prompt length after shrinking each ``trace_block``-token block to ``block`` tokens.

    ``ceil(input_len * block / trace_block)``, clamped so that the prompt still spans exactly
    ``n_blocks`` blocks (the last one partial), i.e. within ``((n-1)*block, n*block]``.
    """
    if n_blocks <= 0:
        return 0
    scaled = math.ceil(input_len * block / trace_block)
    return max((n_blocks - 1) * block + 1, min(n_blocks * block, scaled))


def hash_id_prompt(
    hash_ids: list[int] | tuple[int, ...], length: int, blocks: BlockCache
) -> list[int]:
    """Concatenate the blocks of ``hash_ids`` and cut to ``length`` tokens.

    Two prompts whose ids share a leading run share exactly that many leading token blocks.
    """
    if length > len(hash_ids) * blocks.block_size:
        raise ValueError(
            f"length {length} exceeds {len(hash_ids)} blocks of {blocks.block_size} tokens"
        )
    out: list[int] = []
    for hash_id in hash_ids:
        if len(out) >= length:
            break
        out.extend(blocks.get(hash_id))
    return out[:length]
