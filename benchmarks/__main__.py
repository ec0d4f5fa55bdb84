"""`python -m benchmarks`: the speed and memory runner (benchmarks/perf.py). The sentiment job is
`python -m benchmarks.sentiment`."""

import sys

from .perf import main

if __name__ == "__main__":
    sys.exit(main())
