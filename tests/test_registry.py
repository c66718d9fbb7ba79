"""The registry as the handover between the study and the service: a live `reco-lab serve` started from
`RECO_LAB_MODEL_URI` (no models folder) answers what the registered MLflow model predicts; a missing alias, an
unreachable MLflow server or a corrupt download stop the start-up with one line naming the URI and the cause."""

import http.server
import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from reco_lab.core import console_script, free_port
from reco_lab.data import make_synthetic
from reco_lab.export import load_export
from reco_lab.registry import log_export_model
from reco_lab.service.bench import ServiceFailed, live_service
from reco_lab.precompute import build_demo_export
from reco_lab.tracking import tracked_run

from test_service import get


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    "An embedded store with `reco_lab@champion` pointing at a run's MLflow model over a demo export (als)."
    tmp = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    folder = build_demo_export(tmp / "export", make_synthetic(400, 200, 4_000))
    with tracked_run("als", {}, dataset="synthetic:400", protocol="time", uri=uri) as run:
        source = log_export_model(MlflowClient(uri), run.run_id, folder, "als")
    client = MlflowClient(uri)
    client.create_registered_model("reco_lab")
    version = client.create_model_version("reco_lab", source=source, run_id=run.run_id)
    client.set_registered_model_alias("reco_lab", "champion", version.version)
    return tmp, uri, folder, run.run_id


def started(tmp, uri, model_uri, name):
    env = {
        "MLFLOW_TRACKING_URI": uri,
        "RECO_LAB_MODEL_URI": model_uri,
        "RECO_LAB_MODEL_CACHE_DIR": str(tmp / "cache"),
        "RECO_LAB_MODELS_DIR": str(tmp / "no-such-folder"),  # must not be read
        "RECO_LAB_START_TIMEOUT": "6",  # a server that is down is retried this long
    }
    return live_service(None, env=env, log=tmp / f"{name}.log")


def test_the_service_answers_what_the_registered_model_predicts(registry):
    tmp, uri, folder, _ = registry
    export = load_export(folder)
    users = [int(u) for u in export.users[:20]] + [10**8]
    with started(tmp, uri, "models:/reco_lab@champion", "champion") as service:
        answers = [get(f"{service.url}/reco/als/{u}")[2]["items"] for u in users]
        line = next(x for x in service.log_lines() if x["message"].startswith("serving "))
    assert (
        line["message"].endswith("from models:/reco_lab@champion")
        and line["reco"]["model_uri"] == "models:/reco_lab@champion"
    )
    cached = next((tmp / "cache").glob("*/artifacts/export"))
    predicted = mlflow.pyfunc.load_model(str(cached.parent.parent)).predict(pd.DataFrame({"user_id": users}))
    assert answers == [list(map(int, items)) for items in predicted["items"]]
    assert answers == [export.recommend("als", u, 10) for u in users]


def test_a_runs_uri_works_too(registry):
    tmp, uri, _, run_id = registry
    with started(tmp, uri, f"runs:/{run_id}/model", "runs") as service:
        assert get(f"{service.url}/models")[2] == {"models": ["popular", "knn", "als"]}


@pytest.mark.parametrize("case", ["missing alias", "server down", "corrupt download"])
def test_start_up_stops_with_one_line_naming_the_uri(registry, case):
    tmp, uri, folder, run_id = registry
    model_uri = {
        "missing alias": "models:/reco_lab@nosuch",
        "server down": "models:/reco_lab@champion",
        "corrupt download": f"runs:/{run_id}/model",
    }[case]
    if case == "server down":
        uri = f"http://127.0.0.1:{free_port()}"
    if case == "corrupt download":  # a run's stored model damaged after it was logged
        with tracked_run("als", {}, dataset="synthetic:400", protocol="time", uri=uri) as damaged:
            source = log_export_model(MlflowClient(uri), damaged.run_id, folder, "als")
        victim = Path(source.removeprefix("file://")) / "artifacts" / "export" / "als" / "topk.npy"
        victim.write_bytes(victim.read_bytes()[:-1] + b"x")
        model_uri = f"runs:/{damaged.run_id}/model"
    with pytest.raises(ServiceFailed):
        with started(tmp, uri, model_uri, case.replace(" ", "-")):
            pass
    log = (tmp / f"{case.replace(' ', '-')}.log").read_text()
    errors = [json.loads(line) for line in log.splitlines() if line.startswith("{") and '"error"' in line]
    first = errors[0]["message"]
    assert first.startswith(f"cannot start: cannot download {model_uri}") or first.startswith(
        "cannot start: export file"
    ), first
    expected = {
        "missing alias": "alias nosuch not found",
        "server down": "is not reachable",
        "corrupt download": "sha256",
    }[case]
    assert expected in first.lower() or expected in first, first
    assert "Traceback" not in log


# --- issue 23: starts that share a cache, a half-alive server, SIGTERM during a stalled start --------------------


def test_gunicorn_workers_start_from_one_download(registry):
    "4 workers used to download into one cache folder each (1 boot in 5 failed); the master downloads once now."
    from test_hostile import live_gunicorn

    tmp, uri, folder, _ = registry
    cache = tmp / "gunicorn-cache"
    env = {"MLFLOW_TRACKING_URI": uri, "RECO_LAB_MODEL_URI": "models:/reco_lab@champion"}
    env |= {"RECO_LAB_MODEL_CACHE_DIR": str(cache), "RECO_LAB_MODELS_DIR": str(tmp / "no-such-folder")}
    for boot in range(2):
        with live_gunicorn(None, env=env, log=tmp / f"gunicorn-{boot}.log", workers=4) as service:
            users = [int(u) for u in load_export(folder).users[:8]]
            assert [get(f"{service.url}/reco/als/{u}")[0] for u in users] == [200] * 8
            lines = service.log_lines()
        assert sum(line["message"].startswith("serving ") for line in lines) == 4  # one per worker
        downloads = [p for p in cache.iterdir() if p.is_dir() and not p.is_symlink()]
        assert len(downloads) == boot + 1, downloads  # one per start, kept an hour for processes still reading


class HalfAlive(http.server.BaseHTTPRequestHandler):
    "A tracking server whose /health answers and whose API is unavailable."

    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 503)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"OK")

    do_POST = do_GET

    def log_message(self, *args):
        pass


def test_a_half_alive_tracking_server_is_retried_with_log_lines_until_the_start_timeout(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HalfAlive)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    tracking = f"http://127.0.0.1:{server.server_port}"
    env = {"MLFLOW_TRACKING_URI": tracking, "RECO_LAB_MODEL_URI": "models:/reco_lab@champion"}
    env |= {"RECO_LAB_MODEL_CACHE_DIR": str(tmp_path / "cache"), "RECO_LAB_START_TIMEOUT": "8"}
    try:
        with pytest.raises(ServiceFailed) as failed, live_service(None, env=env, log=tmp_path / "serve.log"):
            pass
    finally:
        server.shutdown()
    lines = [json.loads(line) for line in (tmp_path / "serve.log").read_text().splitlines() if line.startswith("{")]
    retries = [line for line in lines if line["log.level"] == "warning"]
    errors = [line for line in lines if line["log.level"] == "error"]
    assert retries and all("retrying in" in line["message"] and tracking in line["message"] for line in retries)
    assert len(errors) == 1 and errors[0]["message"].startswith("cannot start: cannot download models:/reco_lab")
    assert "attempts in 8 s" in errors[0]["message"] and "exited with code 3" in str(failed.value)


def test_gunicorn_exits_on_sigterm_during_a_stalled_start(tmp_path):
    "A tracking server that never answers: gunicorn logs its retries, and SIGTERM ends it (it used to be ignored)."
    from test_hostile import ROOT

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # connections complete in the kernel; nothing ever answers
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{silent.getsockname()[1]}",
        "RECO_LAB_MODEL_URI": "models:/reco_lab@champion",
        "RECO_LAB_MODEL_CACHE_DIR": str(tmp_path / "cache"),
        "RECO_LAB_START_TIMEOUT": "600",
        "RECO_LAB_PORT": str(free_port()),
        "RECO_LAB_HOST": "127.0.0.1",
        "SENTRY_DSN": "",
    }
    log = tmp_path / "gunicorn.log"
    command = [console_script("gunicorn"), "--config", "docker/gunicorn.conf.py", "reco_lab.service.app:app"]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "retrying in" not in log.read_text() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
        assert "retrying in" in log.read_text(), log.read_text()[-2000:]
        process.terminate()
        assert process.wait(timeout=30) != 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        silent.close()


@pytest.mark.parametrize("case", ["unknown tracking scheme", "a folder that is not a model"])
def test_a_wrong_uri_stops_start_up_with_one_line_and_copies_nothing(registry, case):
    tmp, uri, _, _ = registry
    cache = tmp / f"cache-{case.replace(' ', '-')}"
    model_uri, uri = ("models:/reco_lab@champion", "bogus://x") if case.startswith("unknown") else ("/etc", uri)
    env = {"MLFLOW_TRACKING_URI": uri, "RECO_LAB_MODEL_URI": model_uri, "RECO_LAB_MODEL_CACHE_DIR": str(cache)}
    log = tmp / f"{case.replace(' ', '-')}.log"
    with pytest.raises(ServiceFailed):
        with live_service(None, env=env, log=log):
            pass
    text = log.read_text()
    errors = [json.loads(line) for line in text.splitlines() if line.startswith("{") and '"error"' in line]
    assert len(errors) == 1 and errors[0]["message"].startswith(f"cannot start: cannot download {model_uri}: ")
    assert "Traceback" not in text and "retrying" not in text, text[-2000:]
    assert not [p for p in cache.iterdir() if p.name != ".lock"]
