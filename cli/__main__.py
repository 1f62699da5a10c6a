"""python -m fieldlearn.cli"""
import sys

from fieldlearn.cli.main import main

sys.exit(main())
