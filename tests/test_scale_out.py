"""`reco-lab score` on a real multi-node Ray cluster started on this machine (`ray start --head` and `ray start
--address`, each node its own raylet and object store): partitions on more than one node, data files
byte-identical to `--engine local` and to the champion notebook's export, the same export when a worker node is
killed mid-run, and one line naming the address when no cluster answers."""

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import reco_lab

from reco_lab.core import console_script, free_port

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'reco_lab[scale]' (make test installs it)")

# One token mode on every node and the driver (Ray 2.59+ turns token authentication on for local clusters); the
# nodes listen on the loopback address only.
RAY_ENV = {"RAY_AUTH_MODE": "token", "RAY_DISABLE_USAGE_STATS": "1"}
NODE_OPTIONS = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--object-store-memory", str(200 * 2**20)]


@dataclass
class Node:
    proc: subprocess.Popen
    log: Path

    def kill(self) -> None:
        "SIGKILL to the node's whole process group: its raylet, object store and workers die at once."
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)


def start_node(args: list[str], log: Path, timeout: float = 120, attempts: int = 3) -> Node:
    "`ray start ARGS --block` in a session of its own, once it says it runs; tried again if it gives up."
    for attempt in range(1, attempts + 1):
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [console_script("ray"), "start", *args, *NODE_OPTIONS, "--block"],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **RAY_ENV},
                start_new_session=True,
            )
        node, deadline = Node(proc, log), time.monotonic() + timeout
        while "Ray runtime started" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                node.kill()
                # on a busy machine a raylet can miss the 30 s Ray gives it to register with the head (fixed in
                # ray/_private/node.py): the node gives up, and a second start usually goes through
                if attempt == attempts:
                    raise AssertionError(
                        f"ray start {' '.join(args)} did not start:\n{log.read_text(errors='replace')[-3000:]}"
                    )
                break
            time.sleep(0.3)
        else:
            return node
    raise AssertionError("unreachable")


@contextmanager
def ray_cluster(workers: int = 1) -> Iterator[tuple[str, list[Node]]]:
    "A head (1 CPU) and `workers` worker nodes (1 CPU each) on this machine; the address and the worker nodes."
    port, folder = free_port(), Path(tempfile.mkdtemp(prefix="rt-"))  # short: Ray's socket paths have 107 bytes
    head = start_node(
        ["--head", "--port", str(port), "--include-dashboard=false", "--temp-dir", str(folder)], folder / "head.log"
    )
    nodes = [head]
    try:
        address = f"127.0.0.1:{port}"
        nodes += [start_node(["--address", address], folder / f"worker-{i}.log") for i in range(workers)]
        yield address, nodes[1:]
    finally:
        for node in reversed(nodes):
            node.kill()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict:
    "A small full study (popular and ALS on synthetic data) in its own MLflow store, and its champion's export."
    from reco_lab.catalog import get_spec
    from reco_lab.champion import best_runs_per_model, build_export, select_champion
    from reco_lab.contract import StudySpec, resolve_params
    from reco_lab.evaluation import split_id
    from reco_lab.experiment import run_experiment, setup

    folder = tmp_path_factory.mktemp("study")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    nightly = StudySpec(dataset="synthetic:20000", seed=42, study_id="nightly")
    data, splits = setup(nightly)
    protocol = nightly.protocol
    for name in ("popular", "als"):
        spec = get_spec(name)
        params = resolve_params(spec, data.name, {"factors": 16, "epochs": 3} if name == "als" else {})
        run_experiment(spec, params, data, nightly, splits, uri=uri, log=lambda _: None)
    split = split_id(splits)
    champion = select_champion(data.name, protocol, split, uri=uri)
    served = best_runs_per_model(data.name, protocol, split, uri=uri)
    export = build_export(data, served, champion, folder / "study-export", uri=uri, log=lambda _: None)
    return {"uri": uri, "export": export, "folder": folder}


def data_files(folder: Path) -> dict[str, bytes]:
    "Every file of an export but the manifest (the record of when and how it was made)."
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.npy"))}


def score(study: dict, out: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {"MLFLOW_TRACKING_URI": study["uri"], **RAY_ENV, **(env or {})}
    return reco_lab("score", "--dataset", "synthetic:20000", "--out", str(out), *args, env=env, timeout=900)


def nodes_in(log: str) -> set[str]:
    "The nodes that ran partitions, from `reco-lab score`'s progress lines (`... partition i/n from node ID`)."
    return {line.rsplit(" ", 1)[1] for line in log.splitlines() if " partition " in line and " from node " in line}


@pytest.fixture(scope="module")
def local_export(study) -> Path:
    done = score(study, study["folder"] / "local", "--engine", "local", "--partition-users", "3000")
    assert done.returncode == 0, done.stderr[-3000:]
    return study["folder"] / "local"


def test_local_engine_writes_what_the_champion_notebook_writes(study, local_export):
    assert data_files(local_export) == data_files(study["export"])
    assert len(data_files(local_export)) == 6  # users, seen (2), popular, two models


def test_ray_on_two_nodes_gives_the_local_bytes(study, local_export):
    with ray_cluster(workers=1) as (address, _):
        done = score(
            study, study["folder"] / "ray", "--engine", "ray", "--partition-users", "500", env={"RAY_ADDRESS": address}
        )
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(nodes_in(done.stderr)) >= 2, done.stderr[-3000:]
    assert data_files(study["folder"] / "ray") == data_files(local_export)


def test_a_worker_node_killed_mid_run_gives_the_same_export(study, local_export):
    out = study["folder"] / "killed"
    env = {**os.environ, "PATH": f"{Path(console_script('reco-lab')).parent}:{os.environ['PATH']}"}
    with ray_cluster(workers=1) as (address, (worker,)):
        env |= {"MLFLOW_TRACKING_URI": study["uri"], **RAY_ENV, "RAY_ADDRESS": address}
        args = [
            "score",
            "--dataset",
            "synthetic:20000",
            "--out",
            str(out),
            "--engine",
            "ray",
            "--partition-users",
            "100",
        ]
        proc = subprocess.Popen([console_script("reco-lab"), *args], env=env, stderr=subprocess.PIPE, text=True)
        lines, after_kill = [], []
        for line in proc.stderr:
            (after_kill if worker.proc.poll() is not None else lines).append(line)
            if " partition " in line and worker.proc.poll() is None:
                worker.kill()  # at the first partition taken: the rest of the run goes on without that node
        assert proc.wait(600) == 0, "".join(lines + after_kill)[-3000:]
    assert sum(" partition " in line for line in after_kill) > 10, "the node was not killed mid-run"
    assert data_files(out) == data_files(local_export)


def test_a_cluster_that_does_not_answer_is_one_line_and_the_old_export_stays(study, local_export, tmp_path):
    out = tmp_path / "models"
    done = score(study, out, "--engine", "local")
    assert done.returncode == 0, done.stderr[-3000:]
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    address = f"127.0.0.1:{free_port()}"
    done = score(study, out, "--engine", "ray", "--address", address)
    assert done.returncode == 2
    assert done.stderr.strip() == f"reco-lab score: no Ray cluster answers at {address}: Connection refused"
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["models"]  # no staging folder left beside it
