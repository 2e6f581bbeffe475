"""The API's routers: service (health), OpenAI-compatible, the original QuillGPT's, and tokenize."""
