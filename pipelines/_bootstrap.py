"""Keep this folder off ``sys.path``: ``pipelines/zoomvit.py`` would otherwise shadow the package."""

import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _here]
