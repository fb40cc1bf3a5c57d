"""``python -m vdopt.eval [BUNDLE] ...`` == ``vdopt eval [BUNDLE] ...``."""
import sys

from vdopt.eval.cli import main

sys.exit(main(["eval", *sys.argv[1:]]))
