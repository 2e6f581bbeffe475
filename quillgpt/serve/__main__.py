"""`python -m quillgpt.serve --model NAME|DIR ...`: the same as `quill serve`."""

import sys

from quillgpt.serve.server import main

sys.exit(main())
