"""`python -m calib.convert ...`"""
import sys

from calib.convert.cli import main

sys.exit(main())
