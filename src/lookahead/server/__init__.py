"""OpenAI-compatible HTTP server: batched tree verification over a shared, persistent trie.

`create_app(engine, ...)` builds the ASGI app (FastAPI); `lookahead serve` runs it with uvicorn.
"""
from __future__ import annotations

__all__ = ["create_app"]


def __getattr__(name: str):
    if name == "create_app":  # lazy: importing the package must not pull in FastAPI
        from .app import create_app
        return create_app
    raise AttributeError(name)
