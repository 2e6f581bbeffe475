"""The original QuillGPT entry point, kept for its users: `streamlit run app.py [-- --model DIR] [-- --api-url URL]`.

The page itself is quillgpt/playground/page.py (`quill playground` runs it too).
"""

from quillgpt.playground.page import main

main()
