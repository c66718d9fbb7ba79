"""`reco-lab run --quick` end to end on real ML-100k, against the team setup: a private PostgreSQL + S3 + `mlflow
server` started by `reco_lab.stack`; results read back from MLflow, PostgreSQL, the bucket, the export and the
reports. Before the quick study, a full (non-quick) run of the popular model is made champion, so the tests
can check that a quick study chooses among its own runs only and never moves the `champion` alias.
(The embedded SQLite default is what nbdev_test and the CLI tests below use.)"""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from reco_lab import stack as st
from reco_lab.catalog import MODEL_NAMES as ALL_MODELS
from reco_lab.core import free_port

from conftest import BIN, query, run, tool
from support import reco_lab, study_dirs

MODELS = set(ALL_MODELS)


@pytest.fixture(scope="module")
def tracking_stack(request):
    """PostgreSQL and SeaweedFS of `reco_lab.stack` with an MLflow server on them: the image of
    docker/mlflow.Dockerfile (`make docker-mlflow-image`) where a Docker engine can start, so the quick study
    runs once against the containerised server, else the stack's own `mlflow server`. Either way a `Stack`
    whose tracking URI is the server."""
    from dataclasses import replace

    from conftest import missing_stack_parts, mlflow_container

    if missing := missing_stack_parts():
        pytest.skip(f"tracking stack: {missing}")
    docker = request.getfixturevalue("docker_session")
    folder = Path(tempfile.mkdtemp(prefix="reco-lab-study-stack-"))
    try:
        if docker.engine is None:
            print(f"study on the stack's own mlflow server (no Docker engine: {docker.reason})")
            yield st.stack_up(folder, port=0, workers=1)
        else:
            stores = st.stack_up(folder, mlflow=False)
            with mlflow_container(docker.engine, request.getfixturevalue("mlflow_image"), stores) as port:
                print(f"study on the containerised mlflow server, port {port}")
                yield replace(stores, mlflow_port=port)
    finally:
        st.stack_down(folder, purge=True)


@pytest.fixture(scope="module")
def study(tmp_path_factory, tracking_stack):
    tmp = tmp_path_factory.mktemp("study")
    env = {"MLFLOW_TRACKING_URI": tracking_stack.tracking_uri, "RECO_LAB_MODELS_DIR": str(tmp / "models")}
    seed_env = {**env, "RECO_LAB_MODELS_DIR": str(tmp / "seed-models")}
    seed = reco_lab("run", "--only", "popular,champion", "--output-dir", str(tmp / "seed"), env=seed_env, timeout=900)
    assert seed.returncode == 0, seed.stdout[-3000:] + seed.stderr[-3000:]
    result = reco_lab("run", "--quick", *study_dirs(tmp), env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp, env, result


def client_of(env):
    return MlflowClient(env["MLFLOW_TRACKING_URI"])


def finished_runs(client, quick: bool | None = True):
    "Finished candidate and ranker runs (of the quick study by default; None: all)."
    runs = []
    for exp in client.search_experiments():
        if exp.name == "study":
            runs += client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'")
    return [r for r in runs if quick is None or r.data.tags["quick"] == str(quick).lower()]


def quick_runs(study):
    "The study's client and its quick runs by model."
    client = client_of(study[1])
    return client, {r.data.tags["model"]: r for r in finished_runs(client)}


def test_rows_land_in_postgres_and_artifacts_in_the_bucket(study, tracking_stack):
    _, env, _ = study
    runs = query(
        tracking_stack, "SELECT r.run_uuid, r.status, e.name FROM runs r JOIN experiments e USING (experiment_id)"
    )
    assert {name for _, _, name in runs} >= {"study"}
    finished = [rid for rid, status, _ in runs if status == "FINISHED"]
    params = query(tracking_stack, "SELECT count(*) FROM params WHERE run_uuid = ANY(%s)", finished)[0][0]
    steps = query(
        tracking_stack,
        "SELECT count(DISTINCT step) FROM metrics WHERE run_uuid = ANY(%s) AND key LIKE 'loss_fold_%%'",
        finished,
    )[0][0]
    assert params > 0 and steps > 1
    champion = client_of(env).get_model_version_by_alias("reco_lab", "champion")
    assert champion.run_id in finished
    keys = st.bucket_keys(tracking_stack)
    assert any(champion.run_id in k and k.endswith("model/artifacts/export/manifest.json") for k in keys)
    assert any(k.endswith("estimator/model.pkl") for k in keys) and any(k.endswith("eval/per_user.csv") for k in keys)


def test_a_quick_study_never_moves_the_champion(study):
    tmp, env, _ = study
    client = client_of(env)
    version = client.get_model_version_by_alias("reco_lab", "champion")
    seeded = client.get_run(version.run_id)
    assert seeded.data.tags["model"] == "popular" and seeded.data.tags["quick"] == "false"
    assert seeded.data.tags["champion"] == "true" and version.tags["protocol"] == "last_n"
    quick = finished_runs(client)
    assert max(r.data.metrics["val_map_at_10"] for r in quick) > seeded.data.metrics["val_map_at_10"]
    assert not any("champion" in r.data.tags for r in quick)
    assert len(client.search_model_versions("name = 'reco_lab'")) == 1


def test_progress_and_every_notebook_rendered(study):
    tmp, _, result = study
    assert "[1/7]" in result.stdout and "[7/7] 24_champion_champion done" in result.stdout
    summary = dict(line.split(None, 1) for line in result.stdout.splitlines()[:4] if line.strip())
    assert (summary["interactions"].strip(), summary["users"].strip(), summary["items"].strip()) == (
        "100000",
        "943",
        "1682",
    )
    assert "leak share" in result.stdout and "per user" in result.stdout
    executed = sorted(p.name for p in (tmp / "out").glob("*.ipynb"))
    assert len(executed) == 7 and all((tmp / "out" / n).with_suffix(".html").exists() for n in executed)


def test_runs_have_validation_and_test_metrics_by_fold(study):
    client, runs = quick_runs(study)
    assert set(runs) == MODELS
    split = {r.data.tags["split"] for r in runs.values()}
    assert len(split) == 1 and {r.data.tags["study_id"] for r in runs.values()} != {""}
    for name, r in runs.items():
        assert (
            r.data.params["model"] == name
            and r.data.tags["dataset"] == "ml-100k"
            and r.data.tags["protocol"] == "last_n"
        )
        assert r.data.tags["mlflow.source.name"].endswith(".ipynb") and r.data.tags["mlflow.source.git.commit"]
        assert r.data.tags["mlflow.user"] and r.data.tags["mlflow.source.type"] == "NOTEBOOK"
        (data_input,) = r.inputs.dataset_inputs
        assert data_input.dataset.name == "ml-100k" and len(data_input.dataset.digest) == 16
        notebooks = [a.path for a in client.list_artifacts(r.info.run_id, "notebook")]
        own = Path(r.data.tags["mlflow.source.name"]).stem  # e.g. 18_ranker, as 06_18_ranker_ranker.html
        assert any(own in path for path in notebooks) and any("24_champion" in path for path in notebooks), notebooks
        for metric in ("map_at_10", "val_map_at_10"):
            history = client.get_metric_history(r.info.run_id, f"{metric}_by_fold")
            assert [m.step for m in history] == [0, 1], (name, metric)
            assert np.isclose(np.mean([m.value for m in history]), r.data.metrics[metric])
        for metric in (
            "ndcg_at_10",
            "precision_at_10",
            "recall_at_10",
            "novelty_at_10",
            "serendipity_at_10",
            "fit_time_s",
            "model_size_mb",
            "val_recall_at_10",
            "map_at_10_diff_vs_champion",
            "map_at_10_diff_ci_low",
        ):
            assert metric in r.data.metrics, (name, metric)
        assert [a.path for a in client.list_artifacts(r.info.run_id, "estimator")] == ["estimator/model.pkl"]
        assert "model/MLmodel" in {a.path for a in client.list_artifacts(r.info.run_id, "model")}, name
        assert [a.path for a in client.list_artifacts(r.info.run_id, "eval")] == ["eval/per_user.csv"]
    for name in ("als", "lightfm", "knn", "ease"):
        assert runs[name].data.metrics["val_map_at_10"] > runs["popular"].data.metrics["val_map_at_10"], name


def test_curves_come_from_the_validation_split(study):
    client, runs = quick_runs(study)
    als = runs["als"].info.run_id
    epochs = int(runs["als"].data.params["epochs"])
    for k in (0, 1):
        assert [m.step for m in client.get_metric_history(als, f"loss_fold_{k}")] == list(range(1, epochs + 1))
        assert client.get_metric_history(als, f"val_map_at_10_fold_{k}")
        assert not client.get_metric_history(als, f"map_at_10_fold_{k}")
    ranker = runs["ranker"]
    first = json.loads(ranker.data.params["first_stage"])  # the typed FirstStage, as MLflow holds it
    assert first["model"] in MODELS - {"ranker"}
    best = max((r for m, r in runs.items() if m != "ranker"), key=lambda r: r.data.metrics["val_map_at_10"])
    assert first["model"] == best.data.tags["model"] and first["run_id"] == best.info.run_id
    assert first["val_map_at_10"] == best.data.metrics["val_map_at_10"]
    # CatBoost's curves per iteration: its loss on the training rows and its stopping metric on the held-out rows
    loss = ranker.data.params["loss"].lower()
    learn = client.get_metric_history(ranker.info.run_id, f"learn_{loss}_fold_0")
    stop = [m for m in ranker.data.metrics if m.startswith("eval_") and m.endswith("_fold_0") and loss not in m]
    assert stop, sorted(ranker.data.metrics)  # eval_auc_fold_0 under Logloss, eval_ndcg_top_10_type_base_fold_0 ...
    evals = client.get_metric_history(ranker.info.run_id, stop[0])
    assert [m.step for m in learn] == list(range(len(learn))) and len(learn) > 1 and len(evals) == len(learn)


def test_quick_champion_is_the_best_validation_run_and_its_export_is_verified(study):
    tmp, env, _ = study
    client = client_of(env)
    best = max(finished_runs(client), key=lambda r: r.data.metrics["val_map_at_10"])
    from reco_lab.export import ExportError, load_export

    export = load_export(tmp / "models")
    assert set(export.models) == MODELS and export.manifest["champion"]["run_id"] == best.info.run_id
    assert export.manifest["champion"]["registered_model"] is None  # a quick study registers nothing
    assert best.data.metrics["map_at_10_diff_vs_champion"] == 0.0
    manifest = json.loads((tmp / "models" / "manifest.json").read_text())
    assert set(manifest["files"]) >= {"users.npy", "popular.npy", "ranker/topk.npy", "ease/topk.npy"}
    assert "model/MLmodel" in {a.path for a in client.list_artifacts(best.info.run_id, "model")}
    path = tmp / "models" / "knn" / "topk.npy"
    blob = bytearray(path.read_bytes())
    blob[-3] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(ExportError, match="knn/topk.npy fails its sha256 check"):
        load_export(tmp / "models")


def test_leaderboard_lists_every_model_with_its_interval(study):
    tmp, _, _ = study
    board = (tmp / "reports" / "leaderboard.md").read_text()
    for name in MODELS:
        assert f"| {name}" in board
    assert "(champion)" in board and "Δ vs champion [95% CI]" in board and "leak share" in board
    rows = [line for line in board.splitlines() if re.search(r"\[[+-]\d\.\d{4}, [+-]\d\.\d{4}\]", line)]
    assert len(rows) == len(MODELS) - 1
    assert (tmp / "reports" / "als_curves.png").stat().st_size > 10_000
    assert "html/" in (tmp / "reports" / "index.html").read_text()
    assert (tmp / "reports" / "leaderboard.csv").read_text().startswith("model,val MAP@10,test MAP@10,fold 0,fold 1,")


def test_failing_notebook_stops_with_its_error_and_keeps_earlier_runs(tmp_path):
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    result = reco_lab(
        "run", "--quick", "--only", "popular,knn", "--grid", "knn_neighbours=0", *study_dirs(tmp_path), env=env
    )
    # the command line checks a grid value's type; the field's bounds are checked where the notebook builds its params
    assert result.returncode == 1
    assert "10_baselines (knn) failed in cell" in result.stderr and "knn_neighbours" in result.stderr
    assert "greater than or equal to 1" in result.stderr
    assert str(tmp_path / "out") in result.stderr
    runs = finished_runs(MlflowClient(env["MLFLOW_TRACKING_URI"]), None)
    assert [r.data.tags["model"] for r in runs] == ["popular"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--grid", "factors=abc", "--only", "als"], "takes int values for factors"),
        (
            ["--grid", "knn_weighting=nonsense", "--only", "knn"],
            "takes one of 'cosine', 'tfidf', 'bm25' for knn_weighting",
        ),
        (["--only", ","], "names no job"),
        (["--output-dir", "/proc/no-such-dir/out"], "--output-dir /proc/no-such-dir/out cannot be written"),
        (["--reports-dir", "/proc/no-such-dir/reports"], "--reports-dir /proc/no-such-dir/reports cannot be written"),
        (["--protocol", "random"], "unknown protocol 'random'"),
    ],
)
def test_bad_cli_input_stops_before_anything_runs(tmp_path, args, message):
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    result = reco_lab("run", "--quick", *args, env=env, timeout=300)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert "[1/" not in result.stdout


def test_unreachable_tracking_server_fails_before_any_notebook(tmp_path):
    env = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    result = reco_lab("run", "--quick", "--output-dir", str(tmp_path / "out"), env=env, timeout=120)
    assert result.returncode == 2 and "is not reachable" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_bad_dataset_is_refused_up_front(tmp_path):
    result = reco_lab("run", "--dataset", f"kion:{tmp_path}", timeout=120)
    assert result.returncode == 2 and "interactions.csv, users.csv, items.csv not found" in result.stderr


def test_a_small_dataset_goes_end_to_end(tmp_path):
    "The smallest synthetic dataset the CLI accepts through the folds, kNN and the champion's export."
    env = {
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "RECO_LAB_MODELS_DIR": str(tmp_path / "models"),
    }
    only = ("--only", "popular,knn,champion")
    result = reco_lab("run", "--quick", "--dataset", "synthetic:100", *only, *study_dirs(tmp_path), env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    from reco_lab.export import load_export

    assert load_export(tmp_path / "models").models == ["popular", "knn"]
    small = reco_lab("run", "--quick", "--dataset", "synthetic:99", env=env, timeout=120)
    assert small.returncode == 2 and "at least 100 users" in small.stderr


def test_tune_leaves_a_parent_with_nested_trials(tmp_path):
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    result = reco_lab("tune", "--model", "als", "--trials", "3", "--quick", env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("tuning")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and "best_val_map_at_10" in parents[0].data.metrics
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == 3 and all(
        r.info.status == "FINISHED" and "val_map_at_10" in r.data.metrics for r in children
    )
    assert parents[0].data.metrics["best_val_map_at_10"] == max(r.data.metrics["val_map_at_10"] for r in children)
    assert not any("map_at_10" in r.data.metrics for r in children), "tuning never scores a test"
    bad = reco_lab("tune", "--model", "popular", "--trials", "3", env=env, timeout=120)
    assert bad.returncode == 2 and "invalid choice: 'popular'" in bad.stderr


def test_the_registered_champion_is_an_mlflow_model(study):
    "`mlflow.pyfunc.load_model('models:/reco_lab@champion')` predicts the service's 10 items, with a signature."
    tmp, env, _ = study
    code = (
        "import json, mlflow, pandas as pd\n"
        "model = mlflow.pyfunc.load_model('models:/reco_lab@champion')\n"
        "out = model.predict(pd.DataFrame({'user_id': [1, 2, 100000000]}))\n"
        "sig = model.metadata.signature\n"
        "print(json.dumps({'inputs': sig.inputs.input_names(), 'outputs': sig.outputs.input_names(),\n"
        "                  'items': [list(map(int, i)) for i in out['items']]}))"
    )
    done = run([sys.executable, "-c", code], env=env, cwd=tmp, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["inputs"] == ["user_id"] and answer["outputs"] == ["user_id", "items"]
    assert all(len(items) == len(set(items)) == 10 for items in answer["items"])
    from reco_lab.export import load_export

    seeded = load_export(tmp / "seed-models")  # what the seeded full study exported for the service
    champion = seeded.manifest["champion"]["model"]
    assert answer["items"] == [seeded.recommend(champion, u, 10) for u in (1, 2, 100000000)]


def test_mlflow_models_serve_answers_invocations(study):
    tmp, env, _ = study
    port = free_port()
    log = tmp / "models-serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [
                tool("mlflow"),
                "models",
                "serve",
                "-m",
                "models:/reco_lab@champion",
                "--env-manager",
                "local",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **env, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"},
        )  # its uvicorn
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, log.read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.5)
        body = json.dumps({"dataframe_split": {"columns": ["user_id"], "data": [[1], [2]]}}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as reply:
            predictions = json.load(reply)["predictions"]
        assert [p["user_id"] for p in predictions] == [1, 2]
        assert all(len(set(p["items"])) == 10 for p in predictions)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)


def test_the_service_starts_from_the_registry_on_the_tracking_stack(study):
    "No models folder: `RECO_LAB_MODEL_URI=models:/reco_lab@champion` against PostgreSQL + S3 + mlflow server."
    tmp, env, _ = study
    from reco_lab.export import load_export
    from reco_lab.service.bench import live_service

    seeded = load_export(tmp / "seed-models")
    champion = seeded.manifest["champion"]["model"]
    service_env = {
        **env,
        "RECO_LAB_MODEL_URI": "models:/reco_lab@champion",
        "RECO_LAB_MODEL_CACHE_DIR": str(tmp / "cache"),
        "RECO_LAB_MODELS_DIR": str(tmp / "no-such-folder"),
    }
    with live_service(None, env=service_env, log=tmp / "registry-service.log") as service:
        for user in (1, 2, 100000000):
            with urllib.request.urlopen(f"{service.url}/reco/{champion}/{user}", timeout=10) as reply:
                assert json.load(reply)["items"] == seeded.recommend(champion, user, 10)
