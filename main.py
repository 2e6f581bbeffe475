"""`python main.py`: start the API server, as in the original QuillGPT (same flags as `quill serve`).

Settings also come from QUILL_* environment variables; see docs/serving.md.
"""

import sys

from quillgpt.serve import main

if __name__ == "__main__":
    sys.exit(main(prog="main.py"))
