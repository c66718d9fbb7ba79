"""The local tracking stack for real: PostgreSQL 15, SeaweedFS's S3 (`weed server`) and `mlflow server`, started by
the tests.

One stack serves the module (its first start migrates a new database, ~15 s); each test says what it leaves
running. The fixture stops everything and checks that no process is left behind. The S3 process is killed with
SIGKILL while runs log artifacts, and every artifact logged before the kill must come back.
"""

import os
import pickle
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

from reco_lab import stack as st
from reco_lab.tracking import TrackingUnavailable, check_tracking, tracked_run

from conftest import missing_stack_parts, run, tool

pytestmark = [
    pytest.mark.skipif(os.environ.get("RECO_LAB_SKIP_STACK") == "1", reason="RECO_LAB_SKIP_STACK=1"),
    pytest.mark.skipif(bool(missing_stack_parts()), reason=f"tracking stack: {missing_stack_parts()}"),
]


def leftovers(stack: st.Stack) -> list[str]:
    "Processes of this stack still alive: recorded pids, or anything whose command line names its folders."
    marks = [str(stack.dir), stack.pg_root or str(stack.dir)]  # weed's -dir is inside stack.dir
    found = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            # mlflow server's workers and job consumers inherit its environment, whatever their command line
            if any(m in cmd for m in marks) or p.environ().get("MLFLOW_BACKEND_STORE_URI") == stack.backend_uri:
                found.append(f"{p.pid} {cmd[:120]}")
        except psutil.Error:
            pass
    for name in stack.procs:
        if st.process(stack, name) is not None:
            found.append(f"{name} pid {stack.procs[name][0]}")
    return found


def free_folder() -> Path:
    return Path(tempfile.mkdtemp(prefix="reco-lab-stack-"))


@pytest.fixture(scope="module")
def stack():
    folder = free_folder()
    started = time.monotonic()
    try:
        s = st.stack_up(folder, port=0, workers=1)  # one worker: enough here, and half the start-up CPU
        print(f"stack up in {time.monotonic() - started:.1f} s: {s.tracking_uri}")
        yield s
    finally:
        final = st.Stack.load(folder)
        st.stack_down(folder, purge=True)
        if final is not None:
            assert leftovers(final) == [], "processes outlived `down`"
            assert not Path(final.pg_root).exists() and not folder.exists()


@pytest.fixture
def uri(stack, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.tracking_uri)
    return stack.tracking_uri


def refresh(stack: st.Stack) -> None:
    "Make the fixture's object what `stack.json` now says."
    stack.__dict__.update(st.Stack.load(stack.dir).__dict__)


from conftest import query  # noqa: E402  (shared with test_study, which runs the quick study on its own stack)


def test_up_again_changes_nothing_and_the_cli_reports_it(stack):
    before = dict(stack.procs)
    done = run([tool("reco-lab"), "tracking", "--dir", str(stack.dir), "up"], timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == f"export MLFLOW_TRACKING_URI={stack.tracking_uri}"
    assert st.Stack.load(stack.dir).procs == before
    status = run([tool("reco-lab"), "tracking", "--dir", str(stack.dir), "status"])
    assert status.returncode == 0 and status.stdout.count("running") == 3, status.stdout
    lines = dict(line.split(None, 1) for line in status.stdout.splitlines())
    assert "PostgreSQL" in lines["postgres"] and f"data {stack.pg_root}/data" in lines["postgres"]
    assert f"SeaweedFS      {stack.s3_endpoint} s3://{stack.bucket}  data {stack.dir}/seaweedfs" in lines["s3"]
    assert lines["mlflow"].endswith(f"mlflow server  {stack.tracking_uri}")


def test_a_run_lands_in_postgres_and_its_artifact_in_the_bucket(stack, uri):
    model = {"factors": list(range(5000))}
    with tracked_run(
        "als",
        {"factors": 8, "epochs": 4},
        dataset="stack-test",
        protocol="last_n",
        key_params=("factors",),
        notebook="tests/test_stack.py",
    ) as r:
        for fold in range(3):
            before = r.fit_time_s
            with r.timer():
                for epoch in range(4):
                    r.curves.log(f"loss_fold_{fold}", 1.0 / (epoch + 1), epoch)
            r.log_fold(fold, {"map_at_10": 0.01 * (fold + 1), "recall_at_10": 0.1, "fit_time_s": r.fit_time_s - before})
        r.log_model(model)
        r.log_summary()

    ((name, status, experiment),) = query(
        stack,
        "SELECT r.name, r.status, e.name FROM runs r JOIN experiments e USING (experiment_id) WHERE r.run_uuid = %s",
        r.run_id,
    )
    assert name.startswith("als_") and status == "FINISHED" and experiment == "study"
    params = dict(query(stack, "SELECT key, value FROM params WHERE run_uuid = %s", r.run_id))
    assert params == {"model": "als", "factors": "8", "epochs": "4"}
    by_fold = query(
        stack,
        "SELECT step, value FROM metrics WHERE run_uuid = %s AND key = 'map_at_10_by_fold' ORDER BY step",
        r.run_id,
    )
    assert [(s, round(v, 3)) for s, v in by_fold] == [(0, 0.01), (1, 0.02), (2, 0.03)]
    loss = query(stack, "SELECT step FROM metrics WHERE run_uuid = %s AND key = 'loss_fold_2' ORDER BY step", r.run_id)
    assert [s for (s,) in loss] == [0, 1, 2, 3]
    latest = dict(query(stack, "SELECT key, value FROM latest_metrics WHERE run_uuid = %s", r.run_id))
    assert {"map_at_10", "map_at_10_std", "fit_time_s", "model_size_mb"} <= set(latest)

    keys = [k for k in st.bucket_keys(stack) if r.run_id in k]
    assert len(keys) == 1 and keys[0].endswith(f"{r.run_id}/artifacts/estimator/model.pkl")
    body = st.s3_client(stack).get_object(Bucket=stack.bucket, Key=keys[0])["Body"].read()
    assert pickle.loads(body) == model

    client = MlflowClient(uri)
    client.create_registered_model("stack_test")
    version = client.create_model_version("stack_test", f"runs:/{r.run_id}/estimator", run_id=r.run_id)
    client.set_registered_model_alias("stack_test", "champion", version.version)
    rows = query(
        stack,
        "SELECT v.run_id, a.alias FROM model_versions v JOIN registered_model_aliases a "
        "ON a.name = v.name AND a.version = v.version WHERE v.name = 'stack_test'",
    )
    assert rows == [(r.run_id, "champion")]


def test_a_stopped_server_stops_a_run_before_any_training(stack, uri, tmp_path):
    st.stop_mlflow(stack)
    stack.save()
    try:
        with pytest.raises(TrackingUnavailable, match=r"is not reachable .*`reco-lab tracking up`"):
            check_tracking(uri, timeout=2)
        trained = []
        with pytest.raises(TrackingUnavailable):
            with tracked_run("popular", {}, dataset="stack-test", protocol="last_n"):
                trained.append(1)
        assert trained == []
        status = run([tool("reco-lab"), "tracking", "--dir", str(stack.dir), "status"])
        assert status.returncode == 3 and "mlflow    stopped" in status.stdout, status.stdout
        study = run(
            [
                tool("reco-lab"),
                "run",
                "--quick",
                "--output-dir",
                str(tmp_path / "runs"),
                "--reports-dir",
                str(tmp_path / "reports"),
            ],
            env={"MLFLOW_TRACKING_URI": uri},
            timeout=120,
        )
        assert study.returncode != 0 and "Traceback" not in study.stderr, study.stderr
        assert study.stderr.strip().splitlines() == [f"reco-lab run: {check_error(uri)}"]
        assert not (tmp_path / "runs").exists()  # nothing was executed
    finally:
        kept = {k: stack.procs[k] for k in ("postgres", "s3")}
        st.stack_up(stack.dir)  # only the server comes back
        refresh(stack)
        assert {k: stack.procs[k] for k in ("postgres", "s3")} == kept


def check_error(uri: str) -> str:
    try:
        check_tracking(uri, timeout=2)
    except TrackingUnavailable as e:
        return str(e)
    raise AssertionError(f"{uri} answered")


def test_postgres_restarted_mid_run_the_run_finishes_with_every_metric(stack, uri):
    """PostgreSQL restarts while a run logs a metric every 50 ms. The MLflow client retries what the server
    could not store (HTTP 5xx) and the server's pool reconnects, so the run ends FINISHED with every step."""
    steps, restarted = 60, threading.Event()

    def restart():
        time.sleep(0.5)
        st.stop_postgres(stack)
        time.sleep(1.0)  # the database is really gone for a while
        st.start_postgres(stack)
        restarted.set()

    old_pid = stack.procs["postgres"][0]
    with tracked_run("knn", {"k": 10}, dataset="stack-test", protocol="last_n") as r:
        worker = threading.Thread(target=restart)
        worker.start()
        for step in range(steps):
            r.curves.log("loss_fold_0", 1.0 / (step + 1), step)
            r.curves.flush()
            time.sleep(0.05)
        worker.join()
    assert restarted.is_set() and stack.procs["postgres"][0] != old_pid
    stack.save()
    ((status,),) = query(stack, "SELECT status FROM runs WHERE run_uuid = %s", r.run_id)
    logged = query(
        stack, "SELECT step FROM metrics WHERE run_uuid = %s AND key = 'loss_fold_0' ORDER BY step", r.run_id
    )
    assert status == "FINISHED" and [s for (s,) in logged] == list(range(steps))


def test_down_leaves_no_process_and_up_brings_back_runs_and_artifacts(stack, uri):
    with tracked_run("popular", {"depth": 10}, dataset="stack-test", protocol="last_n") as r:
        r.log_fold(0, {"map_at_10": 0.5})
        r.log_model([1, 2, 3])
    started = time.monotonic()
    st.stack_down(stack.dir)
    down_s = time.monotonic() - started
    assert leftovers(stack) == []
    assert not any(st.port_in_use(p) for p in (stack.pg_port, stack.s3_port, stack.mlflow_port))
    status = run([tool("reco-lab"), "tracking", "--dir", str(stack.dir), "status"])
    assert status.returncode == 3 and status.stdout.count("stopped") == 3, status.stdout

    started = time.monotonic()
    st.stack_up(stack.dir)
    up_s = time.monotonic() - started
    refresh(stack)
    print(f"down in {down_s:.1f} s, up again (no migration) in {up_s:.1f} s")
    client = MlflowClient(uri)
    assert client.get_run(r.run_id).data.metrics["map_at_10_by_fold"] == 0.5
    local = client.download_artifacts(r.run_id, "estimator/model.pkl", tempfile.mkdtemp())
    assert pickle.loads(Path(local).read_bytes()) == [1, 2, 3]


def test_s3_killed_mid_logging_keeps_every_logged_artifact_and_logging_goes_on(stack, uri):
    """SIGKILL to SeaweedFS while a thread logs runs with artifacts through the MLflow server, then `up`: only S3
    comes back (same folder, same port, so MLflow keeps running). Every artifact whose run finished before the kill
    is in the bucket byte for byte, the run in flight finishes (the client retries the server's 5xx), and runs
    after the restart log as before. The loop is bounded (200 runs, 180 s)."""

    def blob(i: int) -> dict:
        return {"run": i, "weights": list(range(i, i + 3000))}

    logged, errors, stop = [], [], threading.Event()

    def log_runs():
        deadline = time.monotonic() + 180
        for i in range(200):
            if stop.is_set() or time.monotonic() > deadline:
                return
            try:
                with tracked_run("popular", {"depth": i}, dataset="stack-test", protocol="last_n") as r:
                    r.log_fold(0, {"map_at_10": i / 1000})
                    r.log_model(blob(i))
                logged.append((time.monotonic(), i, r.run_id))
            except Exception as e:  # recorded: the test fails on any, after the stack is whole again
                errors.append(f"run {i}: {type(e).__name__}: {e}")

    def wait_for(n: int, after: float = 0.0) -> None:
        deadline = time.monotonic() + 120
        while sum(t > after for t, _, _ in logged) < n:
            assert worker.is_alive() and time.monotonic() < deadline, f"logging stalled: {errors}"
            time.sleep(0.05)

    kept = {k: stack.procs[k] for k in ("postgres", "mlflow")}
    worker = threading.Thread(target=log_runs, daemon=True)
    worker.start()
    try:
        wait_for(5)
        weed = st.process(stack, "s3")
        killed_at = time.monotonic()
        weed.send_signal(signal.SIGKILL)
        weed.wait(10)
        before = [(i, run_id) for t, i, run_id in logged if t < killed_at]
        status = run([tool("reco-lab"), "tracking", "--dir", str(stack.dir), "status"])
        assert status.returncode == 3 and "s3        stopped" in status.stdout, status.stdout
        started = time.monotonic()
        st.stack_up(stack.dir)
        back_at = time.monotonic()
        refresh(stack)
        wait_for(3, after=back_at)
    finally:
        stop.set()
        worker.join(60)
    print(f"{len(before)} runs before the kill; S3 back in {back_at - started:.1f} s; {len(logged)} runs in all")
    assert errors == [] and not worker.is_alive()
    assert {k: stack.procs[k] for k in kept} == kept and stack.procs["s3"][0] != weed.pid
    assert [i for _, i, _ in logged] == list(range(len(logged)))  # no run lost, none failed
    client, keys = MlflowClient(uri), set(st.bucket_keys(stack))
    for i, run_id in before + [(i, run_id) for _, i, run_id in logged[len(before) :]]:
        assert any(k.endswith(f"{run_id}/artifacts/estimator/model.pkl") for k in keys), i
        local = client.download_artifacts(run_id, "estimator/model.pkl", tempfile.mkdtemp())
        assert pickle.loads(Path(local).read_bytes()) == blob(i)
        assert client.get_run(run_id).info.status == "FINISHED"


@pytest.fixture
def external_s3():
    "An S3 endpoint the stack did not start (as a team's MinIO would be): a SeaweedFS of the test's own."
    store = st.Stack(free_folder(), bucket="artifacts", s3_key="minio-user", s3_secret="minio-password")
    try:
        st.start_s3(store)
        yield store.s3_endpoint
    finally:
        st.stop_s3(store, grace=0)
        shutil.rmtree(store.dir)


def test_an_external_s3_endpoint_replaces_seaweedfs(stack, uri, external_s3, monkeypatch):
    """Last in the module: the stack moves to a MinIO stand-in (its PostgreSQL stays, so no new migration)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "minio-user")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "minio-password")
    local = stack.procs["s3"]
    done = run(
        [
            tool("reco-lab"),
            "tracking",
            "--dir",
            str(stack.dir),
            "up",
            "--s3-endpoint",
            external_s3,
            "--bucket",
            "artifacts",
        ],
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    refresh(stack)
    assert "s3" not in stack.procs and stack.external_s3 and "external" in done.stdout
    assert not psutil.pid_exists(local[0]) or st.process(st.Stack(stack.dir, procs={"s3": local}), "s3") is None
    with tracked_run("popular", {}, dataset="stack-test", protocol="last_n") as r:
        r.log_model({"top": [1, 2]})
    keys = [k for k in st.bucket_keys(stack) if r.run_id in k]
    assert stack.bucket == "artifacts" and len(keys) == 1 and keys[0].endswith("estimator/model.pkl")
    st.stack_down(stack.dir)
    assert leftovers(stack) == [] and any(
        r.run_id in k for k in st.bucket_keys(stack)
    )  # the external store keeps its data
