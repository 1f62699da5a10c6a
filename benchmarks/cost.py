"""Cost benchmark: LwM's training step against fine-tuning, LwF-MC and a naive LwM, and
the time to learn one increment; the same as `fieldlearn bench cost`.

    python benchmarks/cost.py [--out DIR] [--repeats 20] [fieldlearn bench cost options]

Reads CIFAR-100 from ../shared/data for the time-to-learn part (the product itself needs
no dataset). Writes DIR/cost.json and DIR/cost.md; docs/COST.md shows a run.
"""

from __future__ import annotations

import sys

from fieldlearn.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "cost", *sys.argv[1:]]))
