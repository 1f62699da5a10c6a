"""`python -m fieldlearn.cli`: the same dispatcher as the `fieldlearn` console script
(fieldlearn.cli.main), for a machine where the script is not on PATH."""
import sys

from fieldlearn.cli.main import main

sys.exit(main())
