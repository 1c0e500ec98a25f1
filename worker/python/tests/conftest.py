import os
import sys

HELPER_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if HELPER_DIR not in sys.path:
    sys.path.insert(0, HELPER_DIR)
