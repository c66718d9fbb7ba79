"""`reco-lab run --quick` end to end on real ML-100k, against the team setup: a private PostgreSQL + S3 + `mlflow
server` started by `reco_lab.stack`; results read back from MLflow, PostgreSQL, the bucket, the export and the
reports. (The embedded SQLite default is what nbdev_test and the failing-notebook test below use.)"""
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from reco_lab import stack as st
from reco_lab.core import free_port

from conftest import ROOT, query, run, tool

MODELS = {"popular", "knn", "als", "lightfm", "ranker"}


@pytest.fixture(scope="module")
def tracking_stack():
    folder = Path(tempfile.mkdtemp(prefix="reco-lab-study-stack-"))
    try:
        yield st.stack_up(folder, port=0, workers=1)
    finally:
        st.stack_down(folder, purge=True)


@pytest.fixture(scope="module")
def study(tmp_path_factory, tracking_stack):
    tmp = tmp_path_factory.mktemp("study")
    env = {"MLFLOW_TRACKING_URI": tracking_stack.tracking_uri, "RECO_LAB_MODELS_DIR": str(tmp / "models")}
    result = run([tool("reco-lab"), "run", "--quick", "--output-dir", str(tmp / "out"), "--reports-dir", str(tmp / "reports")],
                 env=env, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp, env, result


def test_rows_land_in_postgres_and_artifacts_in_the_bucket(study, tracking_stack):
    _, env, _ = study
    runs = query(tracking_stack, "SELECT r.run_uuid, r.status, e.name FROM runs r JOIN experiments e USING (experiment_id)")
    assert {name for _, _, name in runs} >= {"candidates", "ranker"}
    finished = [rid for rid, status, _ in runs if status == "FINISHED"]
    params = query(tracking_stack, "SELECT count(*) FROM params WHERE run_uuid = ANY(%s)", finished)[0][0]
    steps = query(tracking_stack, "SELECT count(DISTINCT step) FROM metrics WHERE run_uuid = ANY(%s) AND key LIKE 'loss_fold_%%'", finished)[0][0]
    assert params > 0 and steps > 1
    champion = MlflowClient(env["MLFLOW_TRACKING_URI"]).get_model_version_by_alias("reco_lab", "champion")
    assert champion.run_id in finished
    keys = st.bucket_keys(tracking_stack)
    assert any(champion.run_id in k and k.endswith("export/manifest.json") for k in keys)
    assert any(k.endswith("model/model.pkl") for k in keys)


def client_of(env):
    return MlflowClient(env["MLFLOW_TRACKING_URI"])


def finished_runs(client):
    runs = []
    for exp in client.search_experiments():
        runs += client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'")
    return runs


def test_progress_and_every_notebook_rendered(study):
    tmp, _, result = study
    assert "[1/6]" in result.stdout and "[6/6] 20_select_champion_champion done" in result.stdout
    summary = dict(line.split(None, 1) for line in result.stdout.splitlines()[:4] if line.strip())
    assert (summary["interactions"].strip(), summary["users"].strip(), summary["items"].strip()) == ("100000", "943", "1682")
    executed = sorted(p.name for p in (tmp / "out").glob("*.ipynb"))
    assert len(executed) == 6 and all((tmp / "out" / n).with_suffix(".html").exists() for n in executed)


def test_runs_have_fold_metrics_params_and_artifacts(study):
    _, env, _ = study
    client = client_of(env)
    runs = {r.data.tags["model"]: r for r in finished_runs(client)}
    assert set(runs) == MODELS
    for name, r in runs.items():
        assert r.data.params["model"] == name and r.data.tags["dataset"] == "ml-100k" and r.data.tags["splitter"] == "last_n"
        assert r.data.tags["study_id"] and r.data.tags["source_notebook"].endswith(".ipynb")
        history = client.get_metric_history(r.info.run_id, "map_at_10_by_fold")
        assert [m.step for m in history] == [0, 1]
        assert np.isclose(np.mean([m.value for m in history]), r.data.metrics["map_at_10"])
        for metric in ("ndcg_at_10", "precision_at_10", "recall_at_10", "novelty_at_10", "serendipity_at_10", "fit_time_s", "model_size_mb"):
            assert metric in r.data.metrics, (name, metric)
        assert [a.path for a in client.list_artifacts(r.info.run_id, "model")] == ["model/model.pkl"]
    for name in ("als", "lightfm", "knn"):
        assert runs[name].data.metrics["map_at_10"] > runs["popular"].data.metrics["map_at_10"], name


def test_als_and_ranker_curves_have_steps(study):
    _, env, _ = study
    client = client_of(env)
    runs = {r.data.tags["model"]: r for r in finished_runs(client)}
    als = runs["als"].info.run_id
    epochs = int(runs["als"].data.params["epochs"])
    for k in (0, 1):
        assert [m.step for m in client.get_metric_history(als, f"loss_fold_{k}")] == list(range(1, epochs + 1))
        assert client.get_metric_history(als, f"map_at_10_fold_{k}")
    ranker = runs["ranker"]
    assert ranker.data.params["first_stage"] in MODELS - {"ranker"}
    learn = client.get_metric_history(ranker.info.run_id, "learn_logloss_fold_0")
    evals = client.get_metric_history(ranker.info.run_id, "eval_auc_fold_0")
    assert [m.step for m in learn] == list(range(len(learn))) and len(learn) > 1 and len(evals) == len(learn)


def test_champion_registered_and_export_verified(study):
    tmp, env, _ = study
    client = client_of(env)
    version = client.get_model_version_by_alias("reco_lab", "champion")
    best = max(finished_runs(client), key=lambda r: r.data.metrics["map_at_10"])
    assert version.run_id == best.info.run_id and version.tags["dataset"] == "ml-100k"
    from reco_lab.export import ExportError, load_export

    export = load_export(tmp / "models")
    assert set(export.models) == MODELS and export.manifest["champion"]["run_id"] == best.info.run_id
    assert export.manifest["champion"]["version"] == str(version.version)
    manifest = json.loads((tmp / "models" / "manifest.json").read_text())
    assert set(manifest["files"]) >= {"users.npy", "popular.npy", "ranker/topk.npy"}
    assert [a.path for a in client.list_artifacts(version.run_id, "export") if a.path.endswith("manifest.json")]
    path = tmp / "models" / "knn" / "topk.npy"
    blob = bytearray(path.read_bytes())
    blob[-3] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(ExportError, match="knn/topk.npy fails its sha256 check"):
        load_export(tmp / "models")


def test_leaderboard_lists_every_model_and_marks_the_champion(study):
    tmp, _, _ = study
    board = (tmp / "reports" / "leaderboard.md").read_text()
    for name in MODELS:
        assert f"| {name}" in board
    assert "(champion)" in board and (tmp / "reports" / "als_curves.png").stat().st_size > 10_000
    assert "html/" in (tmp / "reports" / "index.html").read_text()


def test_failing_notebook_stops_with_its_error_and_keeps_earlier_runs(tmp_path):
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    result = run([tool("reco-lab"), "run", "--quick", "--only", "popular,knn", "--grid", "knn_weighting=nonsense",
                  "--output-dir", str(tmp_path / "out"), "--reports-dir", str(tmp_path / "reports")], env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 1
    assert "10_baselines (knn) failed in cell" in result.stderr and "unknown knn_weighting 'nonsense'" in result.stderr
    assert str(tmp_path / "out") in result.stderr
    runs = finished_runs(MlflowClient(env["MLFLOW_TRACKING_URI"]))
    assert [r.data.tags["model"] for r in runs] == ["popular"]


def test_unreachable_tracking_server_fails_before_any_notebook(tmp_path):
    env = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    result = run([tool("reco-lab"), "run", "--quick", "--output-dir", str(tmp_path / "out")], env=env, cwd=ROOT, timeout=120)
    assert result.returncode == 2 and "is not reachable" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_bad_dataset_is_refused_up_front(tmp_path):
    result = run([tool("reco-lab"), "run", "--dataset", f"kion:{tmp_path}"], cwd=ROOT, timeout=120)
    assert result.returncode == 2 and "interactions.csv, users.csv, items.csv not found" in result.stderr
