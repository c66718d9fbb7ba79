"""`reco-lab tune --storage ... --workers 2`: two processes share one Optuna search in a private PostgreSQL (started
here, as `reco_lab.stack` starts it), every trial a nested MLflow run under one parent."""

import optuna
import pytest
from mlflow import MlflowClient

from reco_lab import stack as st

from conftest import missing_stack_parts
from support import reco_lab

TRIALS = 10


@pytest.fixture(scope="module")
def optuna_storage(tmp_path_factory):
    if missing := missing_stack_parts():
        pytest.skip(f"PostgreSQL for the shared search: {missing}")
    stack = st.Stack(tmp_path_factory.mktemp("optuna-pg"))
    st.start_postgres(stack)
    try:
        yield stack.backend_uri  # the stack's database; Optuna's tables live beside nothing else there
    finally:
        st.stop_postgres(stack)


@pytest.fixture(scope="module")
def shared_search(optuna_storage, tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('tune-store') / 'mlflow.db'}"
    args = ("--model", "lightfm", "--trials", str(TRIALS), "--dataset", "synthetic:3000", "--quick")
    done = reco_lab("tune", *args, "--storage", optuna_storage, "--workers", "2", env={"MLFLOW_TRACKING_URI": uri})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return optuna_storage, uri, done


def test_the_search_runs_exactly_its_trials_once_each(shared_search):
    storage, _, _ = shared_search
    (name,) = optuna.get_all_study_names(storage)
    trials = optuna.load_study(study_name=name, storage=storage).get_trials()
    complete = sorted(t.number for t in trials if t.state == optuna.trial.TrialState.COMPLETE)
    assert complete == list(range(TRIALS)), [(t.number, t.state.name) for t in trials]
    extra = [t for t in trials if t.state != optuna.trial.TrialState.COMPLETE]
    assert all(t.state == optuna.trial.TrialState.PRUNED and t.number >= TRIALS for t in extra), extra


def test_every_trial_is_a_child_of_one_parent_and_two_workers_ran_them(shared_search):
    storage, uri, _ = shared_search
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tuning")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.tuning = 'search'")
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(int(c.data.tags["trial"]) for c in children) == list(range(TRIALS))
    assert all(c.info.status == "FINISHED" for c in children) and parent.info.status == "FINISHED"
    assert len({c.data.tags["worker"] for c in children}) == 2, "both workers ran trials"
    best = max(c.data.metrics["val_map_at_10"] for c in children)
    assert parent.data.metrics["best_val_map_at_10"] == best
    (name,) = optuna.get_all_study_names(storage)
    assert optuna.load_study(study_name=name, storage=storage).best_value == best


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--workers", "2"), "--workers above 1 needs --storage"),
        (("--storage", "postgresql+psycopg2://reco:s3cret@127.0.0.1:1/optuna"), "reco:***@127.0.0.1:1/optuna"),
    ],
)
def test_bad_worker_options_are_one_line(extra, message, tmp_path):
    done = reco_lab(
        "tune",
        "--model",
        "knn",
        "--trials",
        "2",
        "--dataset",
        "synthetic:500",
        "--quick",
        *extra,
        env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    )
    assert done.returncode == 2 and message in done.stderr and "s3cret" not in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
