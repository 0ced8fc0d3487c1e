"""Run only the zoomer stage, on cached upstream outputs (see pipelines/full.py for the options).

python pipelines/zoomer.py --config pipelines/configs/demo.yaml [--set KEY=VALUE ...]
"""

import _bootstrap  # noqa: F401  (must come first)

from zoomvit.pipeline.cli import stage_main

if __name__ == "__main__":
    raise SystemExit(stage_main("zoomer"))
