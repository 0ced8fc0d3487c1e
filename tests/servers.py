"""Local servers for tests: a free loopback port, the project's MLflow server (mlflow/serve.sh) and an
in-process S3 server (moto)."""

import contextlib
import logging
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


@contextlib.contextmanager
def s3_server(*buckets: str):
    """A moto S3 server on 127.0.0.1 holding empty ``buckets``, with the environment every S3 client of
    this process reads (endpoint, credentials) pointed at it until the block ends; yields the endpoint."""
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    settings = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}  # fmt: skip
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    s3fs.S3FileSystem.clear_instance_cache()  # instances made before these settings point elsewhere
    try:
        for bucket in buckets:
            boto3.client("s3").create_bucket(Bucket=bucket)
        yield settings["AWS_ENDPOINT_URL"]
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()
