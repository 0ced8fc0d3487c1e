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


def serve(state_dir: Path, port: int, action: str = "--daemon", **env: str) -> subprocess.CompletedProcess:
    """`bash mlflow/serve.sh <action>` on 127.0.0.1:``port`` with its stores in ``state_dir``."""
    settings = {
        "MLFLOW_HOST": "127.0.0.1",
        "MLFLOW_PORT": str(port),
        "MLFLOW_STATE_DIR": str(state_dir),
        "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{state_dir / 'mlflow.db'}",
        "MLFLOW_ARTIFACTS_DESTINATION": str(state_dir / "artifacts"),
        **env,
    }
    proc = subprocess.run(
        ["bash", "mlflow/serve.sh", action], cwd=REPO, env={**os.environ, **settings}, capture_output=True,
        text=True, timeout=180,
    )  # fmt: skip
    log = state_dir / "server.log"
    if action == "--daemon":
        assert proc.returncode == 0, proc.stdout + proc.stderr + (log.read_text()[-3000:] if log.exists() else "")
    return proc


@contextlib.contextmanager
def mlflow_server(state_dir: Path, **env: str):
    """`bash mlflow/serve.sh --daemon` on 127.0.0.1 with its stores in ``state_dir``; yields the URL."""
    port = free_port()
    serve(state_dir, port, **env)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve(state_dir, port, "--stop", **env)
