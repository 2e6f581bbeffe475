"""The playground's server: Streamlit running the page (page.py), with the page's own routes
(live.py) on the same port. `quill playground` runs this file with `streamlit run`; app.py, at the
repository's root, is the same for `streamlit run app.py`."""

import streamlit as st

from quillgpt.playground.launch import PAGE
from quillgpt.playground.live import ROUTES

app = st.App(str(PAGE), routes=ROUTES)
