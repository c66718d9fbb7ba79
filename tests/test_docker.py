"""The images and the compose `service` profile on a real Docker engine, which the tests start themselves (a dockerd
of their own, see conftest.py); where none can start, every test here skips and says why.

`make docker-image` builds the service image twice, with the classic builder and with BuildKit, both with no
network inside the build (the wheels are downloaded on the host first). The base is the official python image when
the engine can pull it, else the local stand-in of scripts/build-python-standin. The image then serves an export
written exactly as `make run` writes it (reco_lab.export.write_export), mounted read-only, as uid 10001 on a
read-only root filesystem; the compose `service` profile comes up healthy on the same export and is torn down.
The MLflow image is built and run by tests/test_study.py, which runs the quick study against it.
"""

import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from support import ROOT, demo_export, get, make_images, run

from reco_lab.core import free_port
from reco_lab.service.app import MAX_USER_ID

SERVICE_IMAGE = "reco-lab-service"  # the Makefile's default name, which docker-compose.yml runs
BUILDKIT_IMAGE = "reco-lab-service:buildkit"


def wait_healthy(engine, container: str, timeout: float = 120) -> float:
    "Seconds until the container's HEALTHCHECK reports healthy; fails with its log if it exits or turns unhealthy."
    started = time.monotonic()
    while True:
        state = json.loads(engine("inspect", "--format", "{{json .State}}", container).stdout)
        health = (state.get("Health") or {}).get("Status")
        if health == "healthy":
            return time.monotonic() - started
        if state["Status"] != "running" or health == "unhealthy" or time.monotonic() - started > timeout:
            logs = engine("logs", "--tail", "30", container, check=False)
            raise AssertionError(f"{container}: {state['Status']}, health {health}:\n{logs.stdout}{logs.stderr}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def images(docker_engine, python_image) -> dict[str, float]:
    "`make docker-image` with the classic builder and with BuildKit; the seconds each took."
    times = {}
    for tag, buildkit in ((SERVICE_IMAGE, False), (BUILDKIT_IMAGE, True)):
        times[tag] = make_images(
            "docker-image", docker_engine, buildkit=buildkit, PYTHON_IMAGE=python_image, SERVICE_IMAGE=tag
        )
    print(f"make docker-image on {python_image}: " + ", ".join(f"{t} {s:.0f} s" for t, s in times.items()))
    return times


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    "A serving export written as `make run` writes it: build_demo_export goes through reco_lab.export.write_export."
    return Path(demo_export(tmp_path_factory.mktemp("export")))


@contextmanager
def service_container(engine, image: str, *options: str) -> Iterator[tuple[str, str]]:
    "`image` run as the README runs it (read-only, /tmp in memory, one worker, port on loopback) until healthy."
    port = free_port()
    name = f"reco-lab-test-{os.getpid()}-{port}"
    published = ("-p", f"127.0.0.1:{port}:8080", "-e", "GUNICORN_WORKERS=1")
    engine("run", "-d", "--name", name, "--read-only", "--tmpfs", "/tmp", *options, *published, image)
    try:
        print(f"{image}: healthy after {wait_healthy(engine, name):.1f} s")
        yield name, f"http://127.0.0.1:{port}"
    finally:
        engine("rm", "-f", name, check=False)


@pytest.fixture(scope="module")
def service(docker_engine, images, export):
    "The classic builder's image with the export mounted read-only."
    with service_container(docker_engine, SERVICE_IMAGE, "-v", f"{export}:/models:ro") as running:
        yield running


def test_both_builders_make_the_same_runtime_image_without_the_build_s_wheels(docker_engine, images):
    configs = {tag: json.loads(docker_engine("image", "inspect", tag).stdout)[0]["Config"] for tag in images}
    for tag, config in configs.items():
        assert config["User"] == "10001:10001", tag
        assert config["Cmd"] == ["gunicorn", "--config", "/etc/reco-lab/gunicorn.conf.py", "reco_lab.service.app:app"]
        assert "/health" in " ".join(config["Healthcheck"]["Test"]) and "RECO_LAB_MODELS_DIR=/models" in config["Env"]
    assert configs[SERVICE_IMAGE]["Env"] == configs[BUILDKIT_IMAGE]["Env"]
    probe = (
        "import importlib.util as u, os, reco_lab.service.app, reco_lab.registry; "
        "print([m for m in ('rectools', 'catboost', 'implicit', 'lightfm', 'sqlalchemy') if u.find_spec(m)], "
        "os.path.exists('/etc/pip.conf'), os.path.exists('/tmp/wheels'), sorted(os.listdir('/models')), "
        "all(u.find_spec(m) for m in ('httptools', 'uvloop')))"
    )
    # the serving path only (uvicorn's fast stack; mlflow-skinny for RECO_LAB_MODEL_URI): no research package, no
    # database driver, no wheels, no pip.conf, no models
    for tag in images:
        done = docker_engine("run", "--rm", tag, "python", "-c", probe)
        assert done.stdout.strip() == "[] False False [] True", (tag, done.stdout)


def test_the_image_serves_the_export_with_the_api_contract(service):
    _, url = service
    assert get(f"{url}/health")[0] == 200
    status, _, body = get(f"{url}/reco/popular/3")
    assert status == 200 and body["user_id"] == 3 and len(body["items"]) == 10
    status, _, body = get(f"{url}/reco/als/3")
    assert status == 200 and len(set(body["items"])) == 10
    assert get(f"{url}/reco/lightgbm/3")[2]["errors"][0]["error_key"] == "model_not_found"
    assert get(f"{url}/reco/popular/{MAX_USER_ID + 1}")[2]["errors"][0]["error_key"] == "user_not_found"
    status, _, body = get(f"{url}/reco/popular/abc")
    assert status == 422 and body["errors"][0]["error_loc"]


def test_the_container_runs_as_non_root_on_a_read_only_filesystem(docker_engine, service):
    name, _ = service
    assert docker_engine("exec", name, "id", "-u").stdout.strip() == "10001"
    for path in ("/models/manifest.json", "/models/new", "/opt/venv/new"):
        done = docker_engine("exec", name, "python", "-c", f"open({path!r}, 'a')", check=False)
        assert done.returncode != 0 and re.search(r"Read-only file system|Permission denied", done.stderr), path
    inspect = json.loads(docker_engine("inspect", name).stdout)[0]
    assert inspect["HostConfig"]["ReadonlyRootfs"] is True and inspect["State"]["Health"]["Status"] == "healthy"
    (mount,) = inspect["Mounts"]
    assert mount["Destination"] == "/models" and mount["RW"] is False


def test_the_baked_image_carries_the_export_root_owned(docker_engine, images, export):
    tag = "reco-lab-service:baked-test"
    baked = ("-f", str(ROOT / "docker" / "baked.Dockerfile"), "--build-arg", f"SERVICE_IMAGE={SERVICE_IMAGE}")
    docker_engine("build", *baked, "--network", "none", "-t", tag, str(export))
    try:
        with service_container(docker_engine, tag) as (name, url):
            assert get(f"{url}/reco/popular/3")[0] == 200
            owners = docker_engine("exec", name, "stat", "-c", "%U %a", "/models", "/models/manifest.json").stdout
            assert owners.split("\n")[:2] == ["root 755", "root 644"]
    finally:
        docker_engine("rmi", tag, check=False)


def test_the_compose_service_profile_comes_up_healthy_serves_and_goes(docker_engine, images, export, tmp_path):
    """docker-compose (1.29, Debian's) brings the `service` profile up on BuildKit's image and the export, waits for
    its healthcheck, and `down` removes its container and network."""
    port, project = free_port(), f"reco-lab-test-{os.getpid()}"
    settings = {
        "SERVICE_IMAGE": BUILDKIT_IMAGE,
        "SERVICE_PORT": str(port),
        "RECO_LAB_MODELS_HOST_DIR": str(export),
        "GUNICORN_WORKERS": "1",
    }
    lines = [line for line in (ROOT / ".env.example").read_text().splitlines() if line.split("=")[0] not in settings]
    (tmp_path / "test.env").write_text("\n".join([*lines, *(f"{k}={v}" for k, v in settings.items())]) + "\n")
    compose = [
        "docker-compose",
        "--project-name",
        project,
        "--env-file",
        str(tmp_path / "test.env"),
        "--profile",
        "service",
    ]
    started = time.monotonic()
    up = run([*compose, "up", "-d", "--no-build"], cwd=ROOT, env=docker_engine.env, timeout=300)
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        (container,) = run([*compose, "ps", "-q", "service"], cwd=ROOT, env=docker_engine.env).stdout.split()
        healthy_s = wait_healthy(docker_engine, container)
        print(
            f"compose service profile: up and healthy in {time.monotonic() - started:.1f} s "
            f"(healthcheck {healthy_s:.1f} s)"
        )
        assert get(f"http://127.0.0.1:{port}/health")[0] == 200
        status, _, body = get(f"http://127.0.0.1:{port}/reco/knn/7")
        assert status == 200 and body["user_id"] == 7 and len(body["items"]) == 10
        labels = json.loads(docker_engine("inspect", container).stdout)[0]["Config"]["Labels"]
        assert labels["com.docker.compose.service"] == "service"  # what Filebeat's autodiscover matches
    finally:
        down = run([*compose, "down", "--volumes", "--remove-orphans"], cwd=ROOT, env=docker_engine.env, timeout=300)
    assert down.returncode == 0, down.stderr[-3000:]
    label = f"label=com.docker.compose.project={project}"
    assert docker_engine("ps", "-aq", "--filter", label).stdout.split() == []
    assert docker_engine("network", "ls", "-q", "--filter", label).stdout.split() == []
