"""The serving layer: an OpenAI-compatible HTTP API over continuous-batching engines.

`run(settings)` starts a server; `create_app(settings)` (in `quillgpt.serve.app`) builds the app.
Modules: settings (ServeSettings), engine (batching thread), schemas, openapi, routes/, metrics, app.
"""

from quillgpt.serve.server import add_serve_arguments, main, run, settings_from_args
from quillgpt.serve.settings import ServeSettings

__all__ = ["ServeSettings", "add_serve_arguments", "main", "run", "settings_from_args"]
