"""A request body -> the engine's prompt token ids -> the engine's KV block hashes.

The router must name blocks exactly as the engines do, or no lookup ever hits. So both steps
reuse vLLM's own code: its ``OnlineRenderer`` (chat template, tokenizer, the same defaults as
the engine's OpenAI layer in :mod:`app.engine_host`) and its block hashing
(``hash_block_tokens`` chained over full blocks, seeded like the engine: the same algorithm
and ``PYTHONHASHSEED``, converted to the 64-bit ints KV events carry).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any


class BlockHasher:
    """Chained block hashes of a token sequence, as vLLM's prefix cache computes them."""

    def __init__(self, block_size: int, algo: str = "sha256"):
        from vllm.utils.hashing import get_hash_fn_by_name
        from vllm.v1.core import kv_cache_utils

        self.block_size = block_size
        self._hash_fn = get_hash_fn_by_name(algo)
        kv_cache_utils.init_none_hash(self._hash_fn)  # the seed the engines resolve too
        self._utils = kv_cache_utils

    def hashes(self, token_ids: Sequence[int], cache_salt: str | None = None) -> list[int]:
        u, size = self._utils, self.block_size
        out: list[int] = []
        parent = None
        for start in range(0, len(token_ids) - size + 1, size):
            extra = (("cache_salt", cache_salt),) if start == 0 and cache_salt else None
            parent = u.hash_block_tokens(self._hash_fn, parent, token_ids[start:start + size],
                                         extra)
            out.append(u.maybe_convert_block_hash(parent))
        return out


class NotRoutable(Exception):
    """The body has no single prompt to route on (a batch, embeddings, invalid fields)."""


class PromptTokenizer:
    """Renders a completion or chat body into the token ids its engine will see."""

    def __init__(self, engine_kwargs: dict[str, Any], served_model_name: str):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.cli_args import (
            FrontendArgs,
            resolve_default_chat_template_kwargs,
        )
        from vllm.renderers import renderer_from_config
        from vllm.renderers.chat_utils import load_chat_template
        from vllm.renderers.online_renderer import OnlineRenderer
        from vllm.usage.usage_lib import UsageContext

        kwargs = {k: v for k, v in engine_kwargs.items() if k != "kv_transfer_config"}
        engine_args = AsyncEngineArgs(served_model_name=[served_model_name], **kwargs)
        vllm_config = engine_args.create_engine_config(UsageContext.OPENAI_API_SERVER)
        args = argparse.Namespace(**(vars(FrontendArgs()) | vars(engine_args)))
        self._model_config = vllm_config.model_config
        self._renderer = OnlineRenderer(
            model_config=self._model_config,
            renderer=renderer_from_config(vllm_config),
            request_logger=None,
            chat_template=load_chat_template(args.chat_template),
            chat_template_content_format=args.chat_template_content_format,
            trust_request_chat_template=args.trust_request_chat_template,
            default_chat_template_kwargs=resolve_default_chat_template_kwargs(args),
        )
        self.block_size = vllm_config.cache_config.block_size
        self.hash_algo = vllm_config.cache_config.prefix_caching_hash_algo

    async def token_ids(self, body: dict[str, Any]) -> list[int]:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.renderers.inputs.preprocess import extract_prompt_components

        try:
            if "messages" in body:
                request = ChatCompletionRequest.model_validate(body)
                result = await self._renderer.render_chat(request, skip_mm_cache=True)
                if isinstance(result, ErrorResponse):
                    raise NotRoutable(result.error.message)
                inputs = result[1]
            elif isinstance(body.get("prompt"), str | list):
                request = CompletionRequest.model_validate(body)
                inputs = await self._renderer.render_completion(request, skip_mm_cache=True)
                if isinstance(inputs, ErrorResponse):
                    raise NotRoutable(inputs.error.message)
            else:
                raise NotRoutable("no prompt or messages")
        except NotRoutable:
            raise
        except Exception as exc:  # noqa: BLE001 - the decode replica will answer the 400
            raise NotRoutable(f"{type(exc).__name__}: {exc}") from exc
        if len(inputs) != 1:
            raise NotRoutable(f"{len(inputs)} prompts in one request")
        ids = extract_prompt_components(self._model_config, inputs[0]).token_ids
        if ids is None:
            raise NotRoutable("prompt has no token ids")
        return list(ids)
