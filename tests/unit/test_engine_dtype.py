"""`--dtype auto` serves what the trainer computes: float32 on CPU (vLLM's own auto would halve a float32 model)."""

from __future__ import annotations

import pytest

from tmem.server.engine import serving_dtype


@pytest.mark.parametrize(("requested", "served"), [("auto", "float32"), ("bfloat16", "bfloat16"),
                                                   ("float32", "float32"), ("half", "half")])
def test_auto_is_float32_on_cpu_and_an_explicit_dtype_is_kept(requested: str, served: str) -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("the CPU rule; on a GPU `auto` stays vLLM's choice")
    assert serving_dtype(requested) == served  # type: ignore[arg-type]
