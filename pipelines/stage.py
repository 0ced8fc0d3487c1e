"""Run one stage of the pipeline on cached upstream outputs (the stages: zoomvit/pipeline/stage_table.py).

python pipelines/stage.py zoomvit --config pipelines/configs/demo.yaml [--set KEY=VALUE ...]
"""

import sys

from zoomvit.pipeline.commands import stage_main

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        from zoomvit.pipeline.stage_table import STAGES

        print(f"usage: python pipelines/stage.py STAGE [options]; STAGE: {', '.join(STAGES)}", file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(stage_main(sys.argv[1], sys.argv[2:]))
