"""The ``zoomvit`` command line (the console script): one subcommand per task, each a function of the
parsed arguments; ``run``, ``stage`` and ``relevance`` hand over to :mod:`zoomvit.pipeline.commands`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from zoomvit import __version__
from zoomvit.errors import UserError
from zoomvit.logs import configure as configure_logging


def _demo_data(args: argparse.Namespace) -> int:
    from zoomvit.data.demo import PRESETS, generate_demo_dataset, preset_image_size

    image_size = preset_image_size(args.preset) if args.image_size is None else args.image_size
    info = generate_demo_dataset(
        args.out_dir,
        train=args.train,
        val=args.val,
        image_size=image_size,
        seed=args.seed,
        samples_per_shard=args.samples_per_shard,
        digit_scale=tuple(args.digit_scale),
        num_clutter=args.num_clutter,
        noise_std=args.noise_std,
        photo_clutter=args.photo_clutter,
        difficulty=PRESETS[args.preset][1] if args.difficulty is None else args.difficulty,
        style=PRESETS[args.preset][0],
    )
    splits = info["splits"]
    print(
        f"wrote {splits['train']['num_samples']} train samples in {len(splits['train']['filenames'])} shards "
        f"and {splits['val']['num_samples']} val samples in {len(splits['val']['filenames'])} shards "
        f"({image_size}px, seed {args.seed}) to {args.out_dir}"
    )
    return 0


def _add_demo_data(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo-data",
        help="write the demo dataset (small digits in clutter) as WebDataset shards",
        description="Write train-NNNNNN.tar / val-NNNNNN.tar shards, classes.txt and _info.json into OUT_DIR.",
    )
    parser.add_argument("out_dir", metavar="OUT_DIR")
    parser.add_argument("--train", type=int, default=2000, help="number of training samples (default: 2000)")
    parser.add_argument("--val", type=int, default=500, help="number of validation samples (default: 500)")
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="image side in pixels (default: the preset's: 128 for fine, shapes and shapes2, else 64)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples-per-shard", type=int, default=256)
    parser.add_argument(
        "--digit-scale",
        type=float,
        nargs=2,
        default=(0.18, 0.45),
        metavar=("LOW", "HIGH"),
        help="digit side as a fraction of the image side (default: 0.18 0.45)",
    )
    parser.add_argument("--num-clutter", type=int, default=6, help="digit fragments per image (default: 6)")
    parser.add_argument("--noise-std", type=float, default=0.08, help="gaussian noise std on a 0..1 scale")
    parser.add_argument("--photo-clutter", action="store_true", help="also paste dimmed crops of sample photos")
    parser.add_argument(
        "--preset",
        choices=("default", "hard", "fine", "shapes", "shapes2"),
        default="default",
        help="default; hard (difficulty 1); fine (the class a texture only in fine detail); shapes and shapes2 (the "
        "class a small shape at any offset, its detail above a 64 px view's resolution); the last three at 128 px",
    )
    parser.add_argument(
        "--difficulty", type=float, default=None, help="the difficulty knob in [0, 1]; overrides --preset"
    )
    parser.set_defaults(func=_demo_data)


def _probe_argv(args: argparse.Namespace, image_size: int) -> list[str]:
    """The probe's arguments in full, defaults spelt out (what its result file records as its command)."""
    options = {"preset": args.preset, "image-size": image_size, "seed": args.seed, "train": args.train,
               "val": args.val, "epochs": args.epochs}  # fmt: skip
    argv = [item for name, value in options.items() for item in (f"--{name}", str(value))]
    return [*argv, "--sizes", *map(str, args.sizes), *(["--out", args.out] if args.out else [])]


def _probe(args: argparse.Namespace) -> int:
    import json
    import shlex

    from zoomvit.data.demo import PRESETS, DemoSpec, preset_image_size
    from zoomvit.data.probe import probe_preset
    from zoomvit.provenance import resolve_source

    style, difficulty = PRESETS[args.preset]
    image_size = preset_image_size(args.preset) if args.image_size is None else args.image_size
    spec = DemoSpec(train=1, val=1, image_size=image_size, seed=args.seed, style=style, difficulty=difficulty)
    source = resolve_source()
    result = {
        "command": shlex.join(["zoomvit", "probe", *_probe_argv(args, image_size)]),
        "preset": args.preset,
        "git": {"commit": source.commit, "dirty": source.dirty},
        **probe_preset(spec, tuple(args.sizes), train=args.train, val=args.val, epochs=args.epochs),
    }
    print(f"probe of the {args.preset} preset stored at {image_size} px (generator seed {args.seed}), "
          f"{args.train} train / {args.val} val samples; chance {result['chance']:.0%}")  # fmt: skip
    strata = sorted(result["rows"][0]["detail_survival"])
    print(
        "size  "
        + "  ".join(f"survival {s:<7}" for s in strata)
        + "  "
        + "  ".join(f"crop top-1 {s:<7}" for s in strata)
    )
    for row in result["rows"]:
        survival = "  ".join(f"{100 * row['detail_survival'][s]:15.2f}%" for s in strata)
        top1 = "  ".join(f"{100 * row['crop_top1'][s]:17.1f}%" for s in strata)
        print(f"{row['size']:4d}  {survival}  {top1}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")
    return 0


def _add_probe(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "probe",
        help="measure a demo preset's construction: detail surviving each input size, a crop classifier's top-1",
        description="Re-render samples of a demo preset, decode them at each input size and report the share of the "
        "class's own detail that survives, and a small CNN's top-1 on object crops (train split -> val split).",
    )
    parser.add_argument("--preset", choices=("fine", "shapes", "shapes2"), default="fine")
    parser.add_argument("--image-size", type=int, default=None, help="the stored size (default: the preset's, 128)")
    parser.add_argument("--seed", type=int, default=1, help="generator seed (default: 1, the development split)")
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[64, 72, 80, 88, 96, 112, 128],
        help="input sizes: the 64 px model, the family members, 112 and the stored size (default)",
    )
    parser.add_argument("--train", type=int, default=2048)
    parser.add_argument("--val", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--out", help="also write the result as JSON here")
    parser.set_defaults(func=_probe)


def _cluster_validate(args: argparse.Namespace) -> int:
    from zoomvit.cluster_config import load_cluster_yaml, validate_cluster_config

    for path in args.files:
        prepared = validate_cluster_config(load_cluster_yaml(path))
        types = ", ".join(
            f"{name} ({spec.get('min_workers', 0)}..{spec.get('max_workers', 0)})"
            for name, spec in prepared["available_node_types"].items()
        )
        print(f"{path}: valid; node types {types}")
    return 0


def _cluster_local(args: argparse.Namespace) -> int:
    from zoomvit.cluster_config import (
        dump_local_config,
        load_cluster_yaml,
        local_autoscaling_config,
        validate_cluster_config,
    )

    config = local_autoscaling_config(
        load_cluster_yaml(args.file),
        cpus_per_node=args.cpus_per_node,
        max_workers_per_type=args.max_workers_per_type,
        idle_timeout_minutes=args.idle_timeout_minutes,
    )
    validate_cluster_config(config)
    text = dump_local_config(config, args.file)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


def _add_cluster(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("cluster", help="validate Ray cluster YAMLs; derive the local autoscaling config")
    sub = parser.add_subparsers(dest="cluster_command", required=True, metavar="ACTION")
    validate = sub.add_parser("validate", help="check cluster-launcher YAMLs the way `ray up` does, offline")
    validate.add_argument("files", nargs="+", metavar="FILE")
    validate.set_defaults(func=_cluster_validate)
    local = sub.add_parser(
        "local", help="the node types of a production YAML, scaled down for a fake multi-node cluster"
    )
    local.add_argument("file", metavar="FILE")
    local.add_argument("-o", "--output", help="write here instead of stdout")
    local.add_argument("--cpus-per-node", type=int, default=1)
    local.add_argument("--max-workers-per-type", type=int, default=2)
    local.add_argument("--idle-timeout-minutes", type=float, default=0.1)
    local.set_defaults(func=_cluster_local)


def _runtime_env(args: argparse.Namespace) -> int:
    import json

    from zoomvit.provenance import submit_env

    env_vars = submit_env(args.checkout)
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--env {item!r}: expected KEY=VALUE")
        env_vars[key] = value
    print(json.dumps({"env_vars": env_vars}))
    return 0


def _add_runtime_env(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "runtime-env",
        help="print a Ray runtime env carrying this checkout's git commit, for `ray job submit --runtime-env-json`",
        description=(
            "`ray job submit --working-dir .` copies the checkout without .git: pass "
            '--runtime-env-json "$(zoomvit runtime-env)" so the pipeline run records the commit (and whether '
            "tracked files had changes) as a local run does."
        ),
    )
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="another env var (repeatable)")
    parser.add_argument("--checkout", default=".", help="the checkout to describe (default: the current directory)")
    parser.set_defaults(func=_runtime_env)


def _add_pipeline(subparsers: argparse._SubParsersAction) -> None:
    """``run``, ``stage NAME`` and ``relevance`` hand their arguments to the pipeline's own parsers
    (the ones behind pipelines/*.py), so both spellings take the same options."""
    from zoomvit.pipeline.stage_table import STAGES

    def forward(name: str, main: Callable[[list[str]], int], help: str) -> argparse.ArgumentParser:
        sub = subparsers.add_parser(name, help=help, add_help=False, prefix_chars="\0")
        sub.add_argument("rest", nargs=argparse.REMAINDER)
        sub.set_defaults(func=lambda args: main(args.rest))
        return sub

    from zoomvit.pipeline import commands

    forward("run", commands.full_main, "run the pipeline (as pipelines/full.py; --help for its options)")
    forward(
        "relevance", commands.relevance_main, "compute teacher relevance maps into Parquet (as pipelines/relevance.py)"
    )
    stage = subparsers.add_parser("stage", help=f"rerun one stage on cached upstream outputs ({', '.join(STAGES)})")
    stage.add_argument("name", choices=list(STAGES))
    stage.add_argument("rest", nargs=argparse.REMAINDER, help="pipeline options (--config, --set, ...)")
    stage.set_defaults(func=lambda args: commands.stage_main(args.name, args.rest))


SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_pipeline,
    _add_demo_data,
    _add_probe,
    _add_cluster,
    _add_runtime_env,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zoomvit", description="ZoomViT pipeline tools")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    configure_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except UserError as exc:
        print(f"{parser.prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
