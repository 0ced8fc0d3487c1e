"""Teacher relevance maps for the configured shards, written as Parquet groups.

python pipelines/relevance.py --config pipelines/configs/demo.yaml [--out DIR] [--checkpoint T.safetensors]
"""

from zoomvit.pipeline.commands import relevance_main

if __name__ == "__main__":
    raise SystemExit(relevance_main())
