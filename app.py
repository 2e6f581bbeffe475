"""The original QuillGPT entry point, kept for its users: `streamlit run app.py [-- --model DIR] [-- --api-url URL]`.

The page itself is quillgpt/playground.py (`quill playground` runs it too).
"""

from quillgpt.playground import main

main()
