"""Class-incremental accuracy benchmark: finetune, lwf_mc, lwm, lc_lad and the joint upper
bound in one run (same class order, seed and base model). A thin entry point for

    fieldlearn bench accuracy [options]          (see benchmarks/README.md)

e.g. `python benchmarks/accuracy.py --preset cpu45 --order-seed 1993 --out results/cpu45`.
"""

import sys

from fieldlearn.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "accuracy", *sys.argv[1:]]))
