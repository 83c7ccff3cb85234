"""Which layer implementation a config asks for: `te` (Transformer Engine) or `local`."""

from __future__ import annotations

from ..utils.runtime import te_available


def resolve_backend(name: str) -> str:
    """`auto` -> `te` where Transformer Engine imports, else `local`."""
    if name == "auto":
        return "te" if te_available() else "local"
    if name == "te" and not te_available():
        raise RuntimeError("backend 'te' needs Transformer Engine with CUDA; use 'local' on this machine")
    if name not in ("te", "local"):
        raise ValueError(f"unknown backend {name!r}; expected auto, te or local")
    return name
