"""The whole ZoomViT pipeline; works under `ray job submit` and as a plain script (local Ray).

ray job submit --working-dir . --runtime-env-json "$(zoomvit runtime-env)" \
    -- python pipelines/full.py --config pipelines/configs/demo.yaml   # the runtime env: the checkout's commit
python pipelines/full.py --config pipelines/configs/tiny.yaml --only zoomvit --set zoomvit.alpha=0.3
"""

from zoomvit.pipeline.commands import full_main

if __name__ == "__main__":
    raise SystemExit(full_main())
