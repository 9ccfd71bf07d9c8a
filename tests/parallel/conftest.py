"""Makes `parallel_helpers` (beside this file) importable by the tests of this folder."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
