"""The original QuillGPT entry point, kept for its users: `streamlit run app.py [-- --model DIR] [-- --api-url URL]`.

The page itself is quillgpt/playground/page.py; this serves it with the page's own routes on the same
port, as `quill playground` does (quillgpt/playground/server.py).
"""

import streamlit as st

from quillgpt.playground.launch import PAGE
from quillgpt.playground.live import ROUTES

app = st.App(str(PAGE), routes=ROUTES)
