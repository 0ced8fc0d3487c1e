"""Local servers for tests: a free loopback port and the project's MLflow server (mlflow/serve.sh)."""

import contextlib
import os
import socket
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(state_dir: Path, **env: str):
    """`bash mlflow/serve.sh --daemon` on 127.0.0.1 with its stores in ``state_dir``; yields the URL."""
    port = free_port()
    settings = {
        "MLFLOW_HOST": "127.0.0.1",
        "MLFLOW_PORT": str(port),
        "MLFLOW_STATE_DIR": str(state_dir),
        "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{state_dir / 'mlflow.db'}",
        "MLFLOW_ARTIFACTS_DESTINATION": str(state_dir / "artifacts"),
        **env,
    }
    env = {**os.environ, **settings}
    proc = subprocess.run(
        ["bash", "mlflow/serve.sh", "--daemon"], cwd=REPO, env=env, capture_output=True, text=True, timeout=180
    )
    log = state_dir / "server.log"
    assert proc.returncode == 0, proc.stdout + proc.stderr + (log.read_text()[-3000:] if log.exists() else "")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        subprocess.run(["bash", "mlflow/serve.sh", "--stop"], cwd=REPO, env=env, capture_output=True, timeout=60)
