"""The one vLLM engine of this replica: AsyncLLM with LoRA enabled, and the tokenizer it serves with."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from tmem.server.settings import Dtype, Settings

if TYPE_CHECKING:
    from vllm import RequestOutput, SamplingParams
    from vllm.lora.request import LoRARequest

log = logging.getLogger(__name__)


class Engine:
    """A thin owner of `AsyncLLM`: start, generate from token ids, add/remove adapters, stop."""

    def __init__(self, llm: Any, tokenizer: Any, max_model_len: int) -> None:
        self.llm = llm
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.active = 0  # requests being generated right now (chats and the inline worker's extraction)

    @classmethod
    def start(cls, settings: Settings) -> Engine:
        """Build the engine (tens of seconds on CPU). vLLM is imported here so `server` imports stay light."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=settings.model,
            served_model_name=[settings.model_name],
            dtype=serving_dtype(settings.dtype),
            max_model_len=settings.max_model_len,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            enable_lora=True,
            max_loras=settings.max_loras,
            max_cpu_loras=max(settings.max_cpu_loras, settings.max_loras),
            max_lora_rank=settings.max_lora_rank,  # type: ignore[arg-type]  # checked in Settings
            enforce_eager=settings.enforce_eager,
            disable_log_stats=True,
        )
        llm = AsyncLLM.from_engine_args(args)
        tokenizer = llm.get_tokenizer()
        log.info("engine ready: model=%s max_model_len=%d", settings.model, settings.max_model_len)
        return cls(llm, tokenizer, settings.max_model_len)

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str, lora: LoRARequest | None
    ) -> AsyncIterator[RequestOutput]:
        """Stream cumulative outputs for one request; the caller aborts by closing the iterator."""
        self.active += 1
        try:
            async for output in self.llm.generate({"prompt_token_ids": prompt_ids}, params, request_id,
                                                  lora_request=lora):
                yield output
        finally:
            self.active -= 1

    async def abort(self, request_id: str) -> None:
        await self.llm.abort(request_id)

    async def add_lora(self, lora: LoRARequest) -> None:
        await self.llm.add_lora(lora)

    async def remove_lora(self, lora_id: int) -> None:
        await self.llm.remove_lora(lora_id)

    def shutdown(self) -> None:
        self.llm.shutdown()


def serving_dtype(requested: Dtype) -> Dtype:
    """`auto` is float32 on CPU: vLLM's own `auto` casts a float32 model to half precision, where the
    demo model then answers "L'Étoile, la Marseillaise..." to "What is the capital of France?" and no
    longer matches what the trainer (float32 on CPU) computes. On GPUs `auto` stays vLLM's choice."""
    from vllm.platforms import current_platform

    return "float32" if requested == "auto" and current_platform.is_cpu() else requested
