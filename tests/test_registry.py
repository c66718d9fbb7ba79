"""The registry as the handover between the study and the service: a live `reco-lab serve` started from
`RECO_LAB_MODEL_URI` (no models folder) answers what the registered MLflow model predicts; a missing alias, an
unreachable MLflow server or a corrupt download stop the start-up with one line naming the URI and the cause."""

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from reco_lab.core import free_port
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
        "RECO_LAB_MODELS_DIR": str(tmp / "no-such-folder"),
    }  # must not be read
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
