"""mlflow/serve.sh: loopback by default, artifacts served through the server, basic auth on request."""

import json
import urllib.error
import urllib.request

import pytest
from conftest import REPO
from mlflow.tracking import MlflowClient
from servers import mlflow_server

pytestmark = pytest.mark.slow


def _status(url: str, auth: tuple[str, str] | None = None, host: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    if auth:
        import base64

        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def test_basic_auth_rejects_anonymous_and_wrong_passwords_and_admits_the_admin(tmp_path, monkeypatch):
    admin = ("zoomvit-admin", "s3cret-for-the-test")
    with mlflow_server(
        tmp_path, MLFLOW_AUTH="basic", MLFLOW_AUTH_ADMIN_USERNAME=admin[0], MLFLOW_AUTH_ADMIN_PASSWORD=admin[1]
    ) as url:
        search = f"{url}/api/2.0/mlflow/experiments/search?max_results=10"
        assert _status(search) == 401
        assert _status(search, (admin[0], "wrong")) == 401
        assert _status(search, admin) == 200

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", admin[0])
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", admin[1])
        client = MlflowClient(tracking_uri=url)
        run = client.create_run(client.create_experiment("auth-check"))
        client.log_metric(run.info.run_id, "val_top1", 0.5)
        (tmp_path / "note.json").write_text(json.dumps({"ok": True}))
        client.log_artifact(run.info.run_id, str(tmp_path / "note.json"))
        assert client.get_run(run.info.run_id).data.metrics == {"val_top1": 0.5}
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["note.json"]
    assert (tmp_path / "artifacts").is_dir(), "artifacts went through the server into its artifact store"
    assert "basic_auth.ini" in {p.name for p in tmp_path.iterdir()}
    assert (tmp_path / "basic_auth.ini").stat().st_mode & 0o077 == 0, "the credentials file is private"


def test_the_kuberay_servers_own_settings_answer_calls_to_its_service_name(tmp_path):

    import yaml

    manifest = REPO / "cluster" / "kuberay" / "mlflow.yaml"
    (deployment,) = [m for m in yaml.safe_load_all(manifest.read_text()) if m["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}  # plain values; secrets come by reference
    with mlflow_server(tmp_path, MLFLOW_ALLOWED_HOSTS=env["MLFLOW_ALLOWED_HOSTS"]) as url:
        search = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
        assert _status(search, host="zoomvit-mlflow:5000") == 200, "what Ray pods send inside the cluster"
        assert _status(search, host="rebinding.example.com") == 403, "other names stay refused"
