"""OpenAI-compatible HTTP server over the streaming engine (`flashmoe serve`).

    with Server("model.gguf", port=0, n_slots=2, n_ctx=4096) as srv:   # background thread
        ... srv.url ...                                                # http://127.0.0.1:PORT (/v1/...)
    Server("model.gguf", port=8080).run()                              # foreground, until Ctrl-C
    create_app(scheduler, tokenizer, metadata, model_id, ...) -> FastAPI   # the app alone
    bench_serve(url or Server, clients, seconds, ...) -> dict              # the load test

Needs the `server` extra (fastapi, uvicorn).
"""

from ..errors import UnsupportedError

__all__ = ["Defaults", "Server", "bench_serve", "create_app"]

_WHERE = {"Defaults": ".app", "create_app": ".app", "bench_serve": ".bench", "Server": ".server"}


def __getattr__(name: str):
    """Imported on first use, so the CLI (and `bench serve`'s options) work without the server extra."""
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    try:
        return getattr(importlib.import_module(_WHERE[name], __name__), name)
    except ImportError as e:
        if (e.name or "").split(".")[0] not in ("fastapi", "uvicorn", "starlette", "pydantic"):
            raise
        raise UnsupportedError(f"the server needs {e.name or 'fastapi and uvicorn'}: "
                               "pip install 'flashmoe-stream[server]'") from None
