"""Process-wide setup for a serving process: log format and PyTorch threads.

Both belong to the process, not to an app, so each process's entry point calls `setup_process`
once: `run` for a single-process server, `app_from_env` in each worker of a multi-process one.
"""

from __future__ import annotations

import torch

from quillgpt.serve.logs import configure_logging
from quillgpt.serve.settings import ServeSettings


def setup_process(settings: ServeSettings) -> None:
    """Send logs to stderr in the configured format and size PyTorch's thread pool."""
    configure_logging(settings.log_level, settings.log_json)
    torch.set_num_threads(settings.resolved_torch_threads())
