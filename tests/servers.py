"""Local servers for tests: a free loopback port, Ray clusters of the tests' own (each with its own temp
dir and ports, stopped by its own processes: never `ray stop`, which would stop a user's Ray too), the
project's MLflow server (mlflow/serve.sh), an in-process S3 server (moto)."""

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

from conftest import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_LOCAL_DIRS: list[str] = []  # the temp dirs of this process's Rays (``ray_local``), removed once shut down


def shutdown_ray_local() -> None:
    """This process's Ray (``ray_local``) shut down and its temp dir removed, leaving the machine's cores
    to a test that runs a cluster of its own. No other Ray is touched."""
    import ray

    ray.shutdown()
    while _LOCAL_DIRS:
        shutil.rmtree(_LOCAL_DIRS.pop(), ignore_errors=True)


def ray_temp_dir() -> str:
    """A temp dir of its own for one Ray cluster: every process of the cluster names it (how
    :func:`stop_own_ray` finds them). Short: the cluster's socket paths (at most ~107 characters) are in it."""
    return tempfile.mkdtemp(prefix="ray-zv-", dir="/tmp")


def local_ray_temp_dir() -> str:
    """:func:`ray_temp_dir` for this process's Ray (``ray_local``), removed by :func:`shutdown_ray_local`."""
    _LOCAL_DIRS.append(ray_temp_dir())
    return _LOCAL_DIRS[-1]


def stop_own_ray(temp_dir: str, remove: bool = True) -> None:
    """Stop the Ray cluster(s) whose temp dir is ``temp_dir`` (their processes and those processes'
    descendants, see ``zoomvit.own_ray``), then remove the dir unless told not to; any other Ray on
    the machine goes on."""
    from zoomvit.own_ray import stop

    stop([temp_dir])
    if remove:
        shutil.rmtree(temp_dir, ignore_errors=True)


def ray_env(**extra: str) -> dict[str, str]:
    """This process's environment for a Ray command line or driver: no ``RAY_ADDRESS`` (the tests name
    their cluster), token auth where Ray has made a token (``~/.ray/auth_token``)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if (Path.home() / ".ray" / "auth_token").exists():
        env["RAY_AUTH_MODE"] = "token"
    return {**env, **extra}


@contextlib.contextmanager
def ray_head(*args: str, num_cpus: int | None = 2, port: int | None = None, dashboard: bool = True,
             env: dict[str, str] | None = None):  # fmt: skip
    """`ray start --head` (plus ``args``) with a temp dir and ports of its own: GCS, dashboard, the
    dashboard agent and the Ray client server each on a free port, none on Ray's defaults (6379, 8265,
    52365, 10001), which a user's Ray may hold. Yields ``{"gcs", "dashboard", "env", "temp_dir"}``
    (``dashboard`` None without one); stopped afterwards by its own processes."""
    env = env if env is not None else ray_env()
    temp_dir, port = ray_temp_dir(), port or free_port()
    command = ["ray", "start", "--head", f"--port={port}", f"--temp-dir={temp_dir}",
               f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
               "--disable-usage-stats", *args]  # fmt: skip
    if num_cpus is not None:
        command.append(f"--num-cpus={num_cpus}")
    dashboard_url = None
    if dashboard:
        dashboard_port = free_port()
        command += ["--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"]
        dashboard_url = f"http://127.0.0.1:{dashboard_port}"
    else:
        command.append("--include-dashboard=false")
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        yield {"gcs": f"127.0.0.1:{port}", "dashboard": dashboard_url, "env": env, "temp_dir": temp_dir}
    finally:
        stop_own_ray(temp_dir)


@contextlib.contextmanager
def own_local_ray(env: dict[str, str] | None = None):
    """The environment for drivers (``pipelines/full.py``) that each start a local Ray of their own even
    where another Ray runs (``RAY_ADDRESS=local``: they never join a user's cluster), in a temp dir of
    the block's own (``RAY_TMPDIR``); yields it. Whatever those Rays leave (a SIGKILLed driver's) is
    stopped at the end; ``stop_own_ray(env["RAY_TMPDIR"], remove=False)`` stops it sooner."""
    temp_dir = ray_temp_dir()
    try:
        yield {**(env if env is not None else ray_env()), "RAY_ADDRESS": "local", "RAY_TMPDIR": temp_dir}
    finally:
        stop_own_ray(temp_dir)


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
    s3fs.S3FileSystem.clear_instance_cache()  # instances made before these settings point elsewhere
    try:
        with environment(**settings):
            for bucket in buckets:
                boto3.client("s3").create_bucket(Bucket=bucket)
            yield settings["AWS_ENDPOINT_URL"]
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


@contextlib.contextmanager
def gcs_server(bucket: str):
    """The GCS emulator (gcp-storage-emulator) on 127.0.0.1, in memory, holding an empty ``bucket``, with
    gcsfs pointed at it until the block ends; yields the endpoint."""
    import importlib

    import fsspec
    from gcp_storage_emulator.server import create_server

    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    server.start()
    registry = importlib.import_module("fsspec.registry")._registry
    saved = {protocol: registry.get(protocol) for protocol in ("gs", "gcs")}
    try:  # gcsfs's HNS probe speaks gRPC to Google's control plane, which the emulator does not serve
        with environment(STORAGE_EMULATOR_HOST=f"http://127.0.0.1:{port}", GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false"):
            from gcsfs.core import GCSFileSystem

            for protocol in saved:  # the plain filesystem, even where gcsfs was imported with the probe on
                fsspec.register_implementation(protocol, GCSFileSystem, clobber=True)
            yield f"http://127.0.0.1:{port}"
    finally:
        for protocol, previous in saved.items():
            if previous is None:
                registry.pop(protocol, None)
            else:
                registry[protocol] = previous
        server.stop()


@contextlib.contextmanager
def environment(**settings: str):
    """These environment variables set until the block ends, then as they were."""
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def s3_proxy(endpoint: str, *, ignore_create_only: bool = False, race: tuple[str, bytes] | None = None):
    """A pass-through HTTP proxy in front of the S3 server at ``endpoint``, with every S3 client of this
    process pointed at it until the block ends; yields the proxy's endpoint. It can behave as stores
    that the cache must survive or refuse: ``ignore_create_only`` drops ``If-None-Match`` (a store that
    ignores create-only puts); ``race=(key suffix, body)`` lets a competing unconditional put of
    ``body`` land just before the first conditional put of a key ending in that suffix (a lost race)."""
    import http.client
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import urlsplit

    import s3fs

    upstream = urlsplit(endpoint)
    raced: list[str] = []
    hop = {"connection", "transfer-encoding", "keep-alive"}

    def forward(method: str, path: str, headers: dict[str, str], body: bytes):
        conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=30)
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.getheaders(), response.read()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_):  # quiet
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _relay(self) -> None:
            body = self._body()
            headers = {k: v for k, v in self.headers.items() if k.lower() not in hop}
            headers["Content-Length"] = str(len(body))
            conditional = "if-none-match" in {k.lower() for k in headers}
            if ignore_create_only:
                headers = {k: v for k, v in headers.items() if k.lower() != "if-none-match"}
            path = self.path.split("?", 1)[0]
            if race and self.command == "PUT" and conditional and path.endswith(race[0]) and not raced:
                raced.append(path)
                plain = {k: v for k, v in headers.items() if k.lower() not in ("if-none-match", "content-md5")}
                plain = {k: v for k, v in plain.items() if not k.lower().startswith("x-amz-checksum")}
                forward("PUT", self.path, {**plain, "Content-Length": str(len(race[1]))}, race[1])
            status, out_headers, payload = forward(self.command, self.path, headers, body)
            self.send_response(status)
            for key, value in out_headers:
                if key.lower() not in hop and key.lower() != "content-length":
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with environment(AWS_ENDPOINT_URL=f"http://127.0.0.1:{server.server_address[1]}"):
            yield os.environ["AWS_ENDPOINT_URL"]
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.shutdown()
