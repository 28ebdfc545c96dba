"""``python -m minillm.compare --worker SPEC``: the per-method scoring subprocess of ``minillm compare``."""

from __future__ import annotations

import sys

from minillm.compare import worker

if len(sys.argv) == 3 and sys.argv[1] == "--worker":
    worker(sys.argv[2])
else:
    sys.exit("internal entry point of minillm compare; use `minillm compare`")
