import os
import sys

# Tests import `tests.helpers` and the repository packages from the root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
