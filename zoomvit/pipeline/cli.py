"""Argument parsing for the thin scripts in ``pipelines/``: parse, load the config, call the library."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from zoomvit.config import ConfigError, PipelineConfig, load_config


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML configuration (pipelines/configs/*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config value, e.g. --set zoomvit.alpha=0.3")
    return parser


def parse_config(args: argparse.Namespace) -> PipelineConfig:
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def relevance_main(argv: list[str] | None = None) -> int:
    from zoomvit.pipeline.runtime import init_ray
    from zoomvit.relevance.stage import run_relevance_stage

    parser = base_parser("Compute teacher relevance maps into Parquet groups.")
    parser.add_argument("--out", required=True, help="output directory for the Parquet groups")
    parser.add_argument("--checkpoint", help="teacher weights (.safetensors or torch state dict); overrides teacher.checkpoint")
    args = parser.parse_args(argv)
    config = parse_config(args)
    init_ray()
    manifest = run_relevance_stage(
        data=config.data, teacher=config.teacher, relevance=config.relevance, out_dir=Path(args.out), checkpoint=args.checkpoint
    )
    print(json.dumps({"rows": manifest["rows"], "skips": manifest["skips"]["counts"], **manifest["stats"]}, indent=2))
    return 0
