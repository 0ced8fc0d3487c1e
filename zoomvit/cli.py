"""The ``zoomvit`` command line: one subcommand per task, each a function of the parsed arguments."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from zoomvit import __version__


def _demo_data(args: argparse.Namespace) -> int:
    from zoomvit.data.demo import generate_demo_dataset

    info = generate_demo_dataset(
        args.out_dir,
        train=args.train,
        val=args.val,
        image_size=args.image_size,
        seed=args.seed,
        samples_per_shard=args.samples_per_shard,
        digit_scale=tuple(args.digit_scale),
        num_clutter=args.num_clutter,
        noise_std=args.noise_std,
        photo_clutter=args.photo_clutter,
    )
    splits = info["splits"]
    print(
        f"wrote {splits['train']['num_samples']} train samples in {len(splits['train']['filenames'])} shards "
        f"and {splits['val']['num_samples']} val samples in {len(splits['val']['filenames'])} shards "
        f"({args.image_size}px, seed {args.seed}) to {args.out_dir}"
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
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels (default: 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples-per-shard", type=int, default=256)
    parser.add_argument(
        "--digit-scale", type=float, nargs=2, default=(0.18, 0.45), metavar=("LOW", "HIGH"),
        help="digit side as a fraction of the image side (default: 0.18 0.45)",
    )
    parser.add_argument("--num-clutter", type=int, default=6, help="digit fragments per image (default: 6)")
    parser.add_argument("--noise-std", type=float, default=0.08, help="gaussian noise std on a 0..1 scale")
    parser.add_argument("--photo-clutter", action="store_true", help="also paste dimmed crops of sample photos")
    parser.set_defaults(func=_demo_data)


SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (_add_demo_data,)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zoomvit", description="ZoomViT pipeline tools")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ValueError as exc:
        print(f"{parser.prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
