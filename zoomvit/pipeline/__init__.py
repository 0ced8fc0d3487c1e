"""The stage graph, fingerprints, cache and the command-line entry points of ``pipelines/``."""
