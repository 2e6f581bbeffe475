"""QuillGPT: a GPT decoder written from scratch in PyTorch, and everything that makes it usable."""

__version__ = "0.2.0"
