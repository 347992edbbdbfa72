import os
import sys

# tests import their helpers (tiny.py) as top-level modules, and the checkout's tools/ as `tools`
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
