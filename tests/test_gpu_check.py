"""bench/gpu_check.py --quick: the GPU check's every section runs on the CPU with tiny models (the same
code a GPU machine runs at imagenet.yaml's sizes), without Ray or MLflow, and its numbers hold."""

import json
import subprocess
import sys

from conftest import REPO

BLOCKED = "import sys; sys.modules.update(dict.fromkeys(['ray', 'mlflow'])); "  # as on the bare GPU machine


def test_the_quick_gpu_check_runs_without_ray_or_mlflow_and_its_checks_hold(tmp_path):
    out = tmp_path / "gpu_check.json"
    run = f"{BLOCKED}import runpy; sys.argv = ['gpu_check.py', '--quick', '--out', {str(out)!r}]; "
    run += "runpy.run_path('bench/gpu_check.py', run_name='__main__')"
    proc = subprocess.run([sys.executable, "-c", run], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["config"] == "tiny.yaml" and result["device"].startswith("cpu")

    checks = result["correctness"]
    assert checks["zoomvit_max_abs_error"] <= 0.05 * max(checks["zoomvit_logit_scale"], 1e-3), "bf16 vs fp32"
    assert checks["padding_invariance_packed_max_abs"] < 1e-4 and checks["padding_invariance_padded_max_abs"] < 1e-4
    low, high = checks["zoomvit_tokens_min_max"]
    assert low < high, "the padding check mixes token counts"
    assert checks["relevance_pearson_vs_fp32"] > 0.9
    assert checks["zoomer_dtype_in_zoomvit_engine"] == "float32"

    rows = {row["stage"]: row for row in result["training"]}
    assert sorted(rows) == ["baseline", "teacher", "zoomer", "zoomvit"]
    for row in rows.values():
        assert row["loss_finite"] and row["loss_falling"], row
        assert row["img_per_s"] > 0 and row["tflops_per_s"] > 0 and row["plain_step_s"] > 0
    names = [row["row"] for row in result["side_by_side"]]
    assert names[0] == "zoomvit" and names[1].startswith("timm ") and "relevance (grad rollout)" in names
