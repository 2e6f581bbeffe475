"""The playground: a Streamlit page to pick a model, sample from it and see how sure it was.

- backend.py   what the page shows (`TokenView`, `Chunk`, `ModelCard`) and the `Backend` protocol
- local.py     `LocalBackend`: models in this process, through `token_chunks` (tokens with their probabilities)
- api.py       `ApiBackend`: models on a running `quill serve`, over its OpenAI-compatible SSE API
- settings.py  the page's settings (arguments after `--`, or the environment), stop strings, seeds
- view.py      the probability view: tokens coloured by probability, as HTML and CSS
- output.py    a generation on the page: streamed in as its tokens arrive, then its rate and tokens
- page.py      the Streamlit page (`streamlit run app.py` and `quill playground` run it)
- launch.py    `quill playground`: `streamlit run` in a subprocess, without importing Streamlit

Nothing is imported here, so `quillgpt.playground.launch` stays free of Streamlit.
"""
