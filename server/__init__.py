"""An OpenAI-compatible local server for a loaded MiniCPM-V pair: `create_app(model, settings)` is the ASGI
app, `serve(model, settings)` runs it with uvicorn, `BackgroundServer` runs it on a thread of this process.
Needs the `server` extra (Starlette, uvicorn)."""

from .app import BackgroundServer, create_app, serve
from .settings import ServerSettings

__all__ = ["BackgroundServer", "ServerSettings", "create_app", "serve"]
