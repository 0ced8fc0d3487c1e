"""The pipeline: its stage table, the plan (fingerprints), the runner and what it records, the stage cache,
and the commands behind ``pipelines/`` and ``zoomvit run|stage|relevance``."""
