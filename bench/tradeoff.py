"""Accuracy vs GFLOPs on the demo benchmark: ZoomViT over an alpha sweep and in token-budget mode,
against the baseline ViT at patch P (8 px, 64 tokens) and at P/2 (4 px, 256 tokens).

    python bench/tradeoff.py [--epochs 14] [--seeds 0] [--no-p2]

Runs the demo pipeline (pipelines/configs/demo.yaml) with ZoomViT and the baselines trained for
--epochs (the demo fine-tunes ZoomViT and the baseline from the teacher for 3; the P/2 baseline
starts from the teacher too, its patch embedding and position grid resampled) and the extra evaluation points; the teacher, relevance maps and Zoomer come
from the demo's cache when it ran before. Prints the table, writes
bench/results/tradeoff.json and tradeoff.png (top-1 vs GFLOPs/img), logs both to MLflow.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from _common import RESULTS, log_to_mlflow, print_table, write_result

REPO = Path(__file__).resolve().parents[1]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, marker in (("zoomvit alpha", "o-"), ("zoomvit budget", "s--"), ("zoomvit+coarse alpha", "d-"), ("baseline", "^")):
        pts = sorted((r["gflops_per_img"], 100 * r["top1"], r.get("top1_std", 0) * 100, r["point"]) for r in rows if r["kind"] == label)
        if not pts:
            continue
        x, y, err, names = zip(*pts)
        ax.errorbar(x, y, yerr=err if any(err) else None, fmt=marker, capsize=3, label=label)
        for xi, yi, name in zip(x, y, names):
            ax.annotate(name, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("GFLOPs / image")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("Demo benchmark: accuracy vs compute")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=str(REPO / "pipelines" / "configs" / "demo.yaml"))
    parser.add_argument("--epochs", type=int, default=14)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--alphas", type=float, nargs="+", default=[1.01, 0.6, 0.45, 0.3, 0.2, 0.1, 0.05])
    parser.add_argument("--budgets", type=int, nargs="+", default=[64, 70, 76, 88, 100])
    parser.add_argument("--no-p2", action="store_true", help="skip the baseline at P/2 (4x the tokens, the slowest to train)")
    parser.add_argument("--coarse-alpha", type=float, default=None, help="also train a ZoomViT that merges 2x2 cells below this score into one 2P token")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    parser.add_argument("--no-mlflow", action="store_true")
    args = parser.parse_args()

    from zoomvit.pipeline.runtime import init_ray

    init_ray()
    variants = [("", [])]
    if args.coarse_alpha is not None:
        alphas = json.dumps([a for a in args.alphas if a >= args.coarse_alpha])
        variants.append(("+coarse", [f"zoomvit.coarse_alpha={args.coarse_alpha}", "evaluate.budgets=[]", f"evaluate.alphas={alphas}"]))
    per_seed = []
    for seed in args.seeds:
        seed_rows = []
        for suffix, extra in variants:
            seed_rows += run_variant(args, seed, suffix, extra)
        per_seed.append({"seed": seed, "rows": seed_rows})
    finish(args, per_seed)


def run_variant(args, seed: int, suffix: str, extra: list[str]) -> list[dict]:
    from zoomvit.config import load_config
    from zoomvit.pipeline.runner import run_pipeline

    overrides = [
        f"data.root={REPO / 'demo_data' / 'demo'}",
        f"artifact_root={REPO / 'runs'}",
        f"zoomvit.train.epochs={args.epochs}",
        f"baseline.train.epochs={args.epochs}",
        f"zoomvit.train.seed={seed}",
        f"baseline.train.seed={seed}",
        f"evaluate.alphas={json.dumps(args.alphas)}",
        f"evaluate.budgets={json.dumps(args.budgets)}",
        *args.set,
        *extra,
    ]
    if not args.no_p2:
        overrides.append("baseline.others=[{name: vit_p4, model: vit_demo_patch8_64, model_kwargs: {patch_size: 4}, init_from_teacher: true}]")
    result = run_pipeline(load_config(args.config, overrides))
    rows = json.loads((Path(result.stages["evaluate"]["out_dir"]) / "evaluation.json").read_text())["rows"]
    print(f"[tradeoff] seed {seed} zoomvit{suffix}: pipeline run {result.run_id}", flush=True)
    if suffix:
        rows = [r for r in rows if r["model"] == "zoomvit"]
    return [{**r, "variant": suffix, "pipeline_run": result.run_id} for r in rows]


def finish(args, per_seed: list[dict]) -> None:
    rows = []
    for i, row in enumerate(per_seed[0]["rows"]):
        same = [s["rows"][i] for s in per_seed]
        if row["model"] == "zoomvit" and row.get("budget") is not None:
            kind, point = f"zoomvit{row['variant']} budget", f"K={row['budget']}"
        elif row["model"] == "zoomvit":
            kind, point = f"zoomvit{row['variant']} alpha", f"a={row['alpha']}"
        else:
            kind, point = "baseline", {"baseline": "ViT P=8", "vit_p4": "ViT P=4"}.get(row["model"], row["model"])
        top1 = np.array([r["top1"] for r in same])
        out = {"kind": kind, "point": point, "tokens_per_img": row["tokens_per_img"], "gflops_per_img": row["gflops_per_img"], "top1": float(top1.mean())}
        out["top1_std"] = float(top1.std()) if len(top1) > 1 else 0.0
        for key in sorted(k for k in row if k.startswith("top1_size_")):
            out[key.replace("top1_size_", "size_")] = float(np.mean([r[key] for r in same]))
        rows.append(out)
    rows.sort(key=lambda r: (r["kind"], r["gflops_per_img"]))

    base = next(r for r in rows if r["point"] == "ViT P=8")
    cheaper = [r for r in rows if r["kind"].startswith("zoomvit") and r["gflops_per_img"] <= base["gflops_per_img"] * 1.0001]
    best = max(cheaper, key=lambda r: r["top1"], default=None)
    small = sorted(k for k in base if k.startswith("size_lt"))
    verdict = {
        "baseline_top1": base["top1"],
        "baseline_gflops": base["gflops_per_img"],
        "best_zoomvit_at_or_below_baseline_gflops": best,
        "margin_points": None if best is None else 100 * (best["top1"] - base["top1"]),
        "margin_small_objects_points": None if best is None or not small else 100 * (best[small[0]] - base[small[0]]),
    }
    verdict["target_met"] = bool(best and verdict["margin_points"] >= 3 and (verdict["margin_small_objects_points"] or 0) > verdict["margin_points"])
    print_table([{k: v for k, v in r.items()} for r in rows])
    print(json.dumps({k: v for k, v in verdict.items() if k != "best_zoomvit_at_or_below_baseline_gflops"}, indent=2))
    figure = RESULTS / "tradeoff.png"
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(rows, figure)
    runs = sorted({r["pipeline_run"] for s in per_seed for r in s["rows"]})
    payload = {"args": vars(args), "pipeline_runs": runs, "rows": rows, "verdict": verdict}
    print(f"wrote {write_result('tradeoff', payload)} and {figure}")
    if not args.no_mlflow:
        metrics = {"margin_points": verdict["margin_points"] or 0.0, "baseline_top1": base["top1"]}
        log_to_mlflow("tradeoff", params={"epochs": args.epochs, "seeds": args.seeds}, metrics=metrics, artifact=payload, figure=figure)


if __name__ == "__main__":
    main()
