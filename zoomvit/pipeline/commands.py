"""The pipeline's commands (run, stage, relevance): parse the options, load the config, call the library.
Behind the thin scripts in ``pipelines/`` and ``zoomvit run|stage|relevance`` (:mod:`zoomvit.cli`)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from zoomvit.config import ConfigError, PipelineConfig, load_config
from zoomvit.errors import UserError
from zoomvit.logs import VERBOSE_ENV, quiet_libraries
from zoomvit.logs import configure as configure_logging
from zoomvit.pipeline.runtime import terminated
from zoomvit.pipeline.stage_table import STAGES


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML configuration (pipelines/configs/*.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set zoomvit.alpha=0.3",
    )
    return parser


def parse_config(args: argparse.Namespace) -> PipelineConfig:
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def relevance_main(argv: list[str] | None = None) -> int:
    configure_logging()
    from zoomvit.pipeline.runtime import init_ray
    from zoomvit.relevance.job import run_relevance_stage

    parser = base_parser("Compute teacher relevance maps into Parquet groups.")
    parser.add_argument("--out", required=True, help="output directory for the Parquet groups")
    parser.add_argument(
        "--checkpoint", help="teacher weights (.safetensors or torch state dict); overrides teacher.checkpoint"
    )
    args = parser.parse_args(argv)
    config = parse_config(args)
    init_ray()
    quiet_libraries()
    manifest = run_relevance_stage(
        data=config.data,
        teacher=config.teacher,
        relevance=config.relevance,
        out_dir=Path(args.out),
        checkpoint=args.checkpoint,
    )
    print(json.dumps({"rows": manifest["rows"], "skips": manifest["skips"]["counts"], **manifest["stats"]}, indent=2))
    return 0


def _stage_list(value: str) -> list[str]:
    return [s for s in value.split(",") if s]


def _dry_run(config: PipelineConfig, args: argparse.Namespace) -> int:
    from zoomvit.pipeline.cache import open_cache
    from zoomvit.pipeline.plan import plan_run, shards_of
    from zoomvit.pipeline.records import lineage_from_run
    from zoomvit.tracking.runs import Tracker, resolve_tracking_uri

    try:
        reused = {}
        if args.from_run:
            tracker = Tracker(resolve_tracking_uri(config.tracking.uri), config.tracking.experiment)
            reused = lineage_from_run(tracker, args.from_run)["stages"]
        plan = plan_run(
            config,
            shards_of(config),
            open_cache(config),
            only=args.only,
            force=args.force,
            reused=reused,
        )
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for step in plan:
        print(step.line())
    return 2 if any(step.action == "missing" for step in plan) else 0


def full_main(argv: list[str] | None = None) -> int:
    configure_logging()
    from zoomvit.pipeline.runner import run_pipeline
    from zoomvit.pipeline.runtime import init_ray

    parser = base_parser("Run the ZoomViT pipeline: teacher -> relevance -> zoomer -> {zoomvit, baseline} -> evaluate.")
    parser.add_argument(
        "--only",
        type=_stage_list,
        default=[],
        metavar="STAGE[,STAGE]",
        help=f"rerun just these stages ({', '.join(STAGES)}) on cached upstream outputs",
    )
    parser.add_argument(
        "--force", type=_stage_list, default=[], metavar="STAGE[,STAGE]", help="recompute these stages even when cached"
    )
    parser.add_argument(
        "--from-run", help="reuse the outputs recorded by this MLflow pipeline run where fingerprints match"
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="also show Ray Data progress bars, Ray Train and DeepSpeed logs (otherwise only in Ray's log files)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print which stages would run or come from the cache, and why; run nothing",
    )
    args = parser.parse_args(argv)
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"
    config = parse_config(args)
    if args.dry_run:
        return _dry_run(config, args)
    init_ray()
    quiet_libraries()
    try:
        result = run_pipeline(config, only=args.only, force=args.force, from_run=args.from_run)
    except KeyboardInterrupt:
        how = "SIGTERM" if terminated() else "an interrupt"
        print(f"stopped by {how}; the runs that were open are marked KILLED in MLflow", file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated() else signal.SIGINT)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = {name: node["cache"] for name, node in result.stages.items()}
    print(
        json.dumps(
            {
                "mlflow_run": result.run_id,
                "tracking_uri": result.tracking_uri,
                **({"mlflow_ui": result.ui_url} if result.ui_url else {}),
                "stages": summary,
                "warnings": result.warnings,
            },
            indent=2,
        )
    )
    return 0


def stage_main(stage: str, argv: list[str] | None = None) -> int:
    """``pipelines/stage.py NAME``: the pipeline restricted to one stage (upstream from the cache)."""
    return full_main(["--only", stage, *(argv if argv is not None else sys.argv[1:])])
