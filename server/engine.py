"""The one vLLM engine of this replica: AsyncLLM with LoRA enabled, and the tokenizer it serves with."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tmem.server.settings import Dtype, Settings

if TYPE_CHECKING:
    from vllm import RequestOutput, SamplingParams
    from vllm.lora.request import LoRARequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    """How to sample one request, in the engine's terms but without vLLM (the protocol builds these)."""

    max_tokens: int
    temperature: float = 0.0  # vLLM samples greedily at 0
    top_p: float = 1.0
    min_tokens: int = 0
    stop: Sequence[str] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    json_schema: dict[str, Any] | None = None
    json_object: bool = False


def sampling_params(sampling: Sampling) -> SamplingParams:
    """vLLM's SamplingParams for `sampling`; vLLM's own checks (e.g. a malformed schema) raise ValueError."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import StructuredOutputsParams

    structured = None
    if sampling.json_schema is not None:
        # Compact JSON (still valid JSON): free whitespace lets small models pad until max_tokens.
        structured = StructuredOutputsParams(json=sampling.json_schema, disable_any_whitespace=True)
    elif sampling.json_object:
        structured = StructuredOutputsParams(json_object=True)
    try:
        return SamplingParams(
            temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_tokens,
            min_tokens=sampling.min_tokens, stop=list(sampling.stop), seed=sampling.seed,
            presence_penalty=sampling.presence_penalty, frequency_penalty=sampling.frequency_penalty,
            structured_outputs=structured,
            # output_kind stays CUMULATIVE: the chat service diffs the text itself and times the first
            # token on the first output, which FINAL_ONLY would not send.
        )
    except VLLMValidationError as exc:
        raise ValueError(str(exc)) from exc


def lora_request(name: str, lora_id: int, path: Path) -> LoRARequest:
    """vLLM's handle of one adapter directory; `lora_id` must be unique while the adapter is loaded."""
    from vllm.lora.request import LoRARequest

    return LoRARequest(lora_name=name, lora_int_id=lora_id, lora_path=str(path))


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
