"""Fast-weight math for TMEM: SVD-initialized Δ = B·A0, the online trainer, extraction, PEFT I/O.

This package knows nothing of HTTP, Redis or vLLM; `server/` wires it up.
"""
