"""`grokstack serve`: the xAI/OpenAI-compatible HTTP API (FastAPI + uvicorn) over the serving engine."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

from ..lm import LM
from ..notices import banner
from .app import Settings, create_app

log = logging.getLogger("grokstack.server")

__all__ = ["Settings", "create_app", "model_id_for", "serve"]


def model_id_for(lm: LM, ref: str) -> str:
    """The id clients send: grok-1 / grok-2 for Grok checkpoints, else the file or folder name."""
    if lm.config.arch in ("grok-1", "grok-2"):
        return lm.config.arch
    name = lm.path.name.split(".")[0] if lm.path and lm.path.suffix == ".gguf" else (lm.path.name if lm.path else ref)
    return name.lower()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(lm: LM, engine, settings: Settings, host: str, port: int, grace: float) -> None:
    import uvicorn

    app = create_app(lm, engine, settings)
    if app.state.api.keys.open and not is_loopback(host):
        log.warning("serving on %s without an API key: anyone who can reach it can use it (set --api-key)", host)
    Path(settings.state_dir).mkdir(parents=True, exist_ok=True)
    print(f"grokstack serving '{settings.model_id}' on http://{host}:{port}/v1", flush=True)
    if lm.notice.lines:
        print(banner(lm.notice), flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=grace)
