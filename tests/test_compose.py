"""The Docker stack without a Docker engine: docker-compose.yml, the Dockerfiles, Filebeat and the Elasticsearch
mapping are checked for consistency, and the service runs exactly as its image runs it (gunicorn with
docker/gunicorn.conf.py) to show that its real log lines fit the mapping Filebeat ships them into."""
import http.server
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, run

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
PROFILES = {"tracking": {"postgres", "minio", "minio-bucket", "mlflow"}, "service": {"service"},
            "elk": {"elasticsearch", "elk-setup", "kibana", "kibana-setup", "filebeat"}}
ONE_SHOT = {"minio-bucket", "elk-setup", "kibana-setup"}
FILEBEAT = yaml.safe_load((ROOT / "docker" / "filebeat.yml").read_text())
TEMPLATE = json.loads((ROOT / "docker" / "elasticsearch" / "reco-lab-service.template.json").read_text())
DATA_VIEW = json.loads((ROOT / "docker" / "kibana" / "data-view.json").read_text())
# ${VAR}, ${VAR:-default}, ${VAR:?error}; `$$` escapes a variable for the container's shell
INTERPOLATION = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def env_example() -> dict[str, str]:
    pairs = [line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    return {k.strip(): v.strip() for k, v in pairs}


def profile_of(name: str) -> str:
    (profile,) = SERVICES[name]["profiles"]
    return profile


# --- docker-compose.yml ---------------------------------------------------------------------------------------

def test_each_part_is_a_profile_that_starts_alone():
    assert {name: set(s.get("profiles", [])) for name, s in SERVICES.items()} == {
        name: {profile} for profile, names in PROFILES.items() for name in names}
    for name, service in SERVICES.items():
        for target in service.get("depends_on", {}):
            assert profile_of(target) == profile_of(name), f"{name} depends on {target} of another profile"


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
        tag = image.rsplit(":", 1)[-1] if ":" in image else ""
        assert tag and tag != "latest" and re.search(r"\d", tag), f"{name}: image {image!r} is not pinned"


def test_every_variable_is_in_env_example_and_secrets_have_no_default():
    text = (ROOT / "docker-compose.yml").read_text()
    used = {m.group(1): (m.group(2), m.group(3)) for m in INTERPOLATION.finditer(text)}
    example = env_example()
    assert set(used) == set(example), f"only in compose: {set(used) - set(example)}; only in .env.example: {set(example) - set(used)}"
    for var, (op, default) in used.items():
        if re.search(r"PASSWORD|SECRET|ENCRYPTION_KEY|TOKEN|DSN", var):
            assert op == ":?" or (op == ":-" and default == ""), f"{var} must come from .env, not a default in compose"
    secret_values = [v for k, v in example.items() if "PASSWORD" in k or "KEY" in k]
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
    mlflow = SERVICES["mlflow"]
    assert mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")
    assert "@postgres:5432/" in mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert "--artifacts-destination=s3://${MLFLOW_BUCKET:-mlflow}" in mlflow["command"]
    assert "$$MLFLOW_BUCKET" in SERVICES["minio-bucket"]["command"][0]
    assert mlflow["ports"] == ["127.0.0.1:${MLFLOW_PORT:-5000}:5000"]


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
    bare = run([*compose_cli(), "--env-file", str(tmp_path / "empty.env"), "--profile", profile, "config", "--quiet"],
               cwd=ROOT, env={k: "" for k in env_example()})
    assert bare.returncode != 0 and re.search(r"set [A-Z_]+PASSWORD in \.env", bare.stderr), bare.stderr


# --- Dockerfiles ----------------------------------------------------------------------------------------------

def dockerfile(path: str) -> str:
    return re.sub(r"\\\n\s*", " ", (ROOT / path).read_text())


def test_service_dockerfile_is_multi_stage_non_root_with_gunicorn_and_a_healthcheck():
    text = dockerfile("Dockerfile")
    stages = re.findall(r"^FROM (\S+) AS (\S+)", text, re.M)
    assert [s for _, s in stages] == ["build", "runtime", "baked"]
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)", text, re.M).group(1)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base)
    runtime = text.split("AS runtime")[1].split("AS baked")[0]
    assert re.search(r"^USER 10001:10001$", runtime, re.M) and "HEALTHCHECK" in runtime and "/health" in runtime
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", runtime, re.M).group(1))
    assert cmd == ["gunicorn", "--config", "/etc/reco-lab/gunicorn.conf.py", "reco_lab.service.app:app"]
    assert "COPY docker/gunicorn.conf.py /etc/reco-lab/gunicorn.conf.py" in runtime
    assert "RECO_LAB_MODELS_DIR=/models" in runtime and SERVICES["service"]["environment"]["RECO_LAB_MODELS_DIR"] == "/models"


def test_build_context_holds_every_copied_file():
    allowed = [line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")]
    for path in ("Dockerfile",):
        for sources in re.findall(r"^COPY (?!--from)(?:--\S+ )*(.+) \S+$", dockerfile(path), re.M):
            for source in sources.split():
                assert source in allowed, f"{path} copies {source}, which .dockerignore leaves out"
                assert source == "models" or (ROOT / source).exists(), source


def test_mlflow_image_runs_the_tested_mlflow_with_postgres_and_s3_drivers():
    text = dockerfile("docker/mlflow.Dockerfile")
    pins = dict(re.findall(r"(mlflow|psycopg2-binary|boto3)==(\S+)", text))
    assert pins == {d: importlib.metadata.version(d) for d in ("mlflow", "psycopg2-binary", "boto3")}
    assert re.search(r"^USER 10002:10002$", text, re.M) and "HEALTHCHECK" in text


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
        raise ModuleNotFoundError(f"No module named {name!r} (its distribution {sorted(dists)} is not in the image)", name=name)
sys.meta_path.insert(0, NotInImage())
from reco_lab.service.app import create_app
create_app()
runpy.run_path("docker/gunicorn.conf.py")
print("ok")
"""


def test_the_app_imports_with_only_what_the_image_installs():
    pinned = dict(line.split("==") for line in (ROOT / "docker" / "service-requirements.txt").read_text().splitlines()
                  if line and not line.startswith("#"))
    assert {norm(k): v for k, v in pinned.items()} == {norm(k): importlib.metadata.version(k) for k in pinned}, \
        "docker/service-requirements.txt pins other versions than the tests run"
    allowed = sorted(with_dependencies(set(pinned)) | {"reco-lab"})
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
    assert source["type"] == "filestream" and source["paths"] == ["/var/lib/docker/containers/${data.docker.container.id}/*.log"]
    container, ndjson = source["parsers"]
    assert set(container) == {"container"} and container["container"]["stream"] == "all"
    assert ndjson["ndjson"] == {"target": "", "overwrite_keys": True, "expand_keys": True, "add_error_key": True,
                                "message_key": "message"}
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
    assert "./docker/elasticsearch/reco-lab-service.template.json:/setup/reco-lab-service.template.json:ro" in SERVICES["elk-setup"]["volumes"]
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


class SentrySink(http.server.ThreadingHTTPServer):
    "Accepts the Sentry SDK's envelopes, so the service runs with Sentry on (trace ids) and nothing fails."

    def __init__(self):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def image_like_service(tmp_path_factory):
    "The service as the image runs it: gunicorn, docker/gunicorn.conf.py, the environment compose passes."
    from reco_lab.data import make_synthetic
    from reco_lab.service.bench import free_port
    from reco_lab.service.demo import build_demo_export

    folder = tmp_path_factory.mktemp("image")
    models = build_demo_export(folder / "models", make_synthetic(300, 150, 3_000))
    sink, port = SentrySink(), free_port()
    env = {**os.environ, "RECO_LAB_MODELS_DIR": str(models), "RECO_LAB_PORT": str(port), "RECO_LAB_EMULATE_ERRORS": "1",
           "SENTRY_DSN": f"http://key@127.0.0.1:{sink.server_port}/1", "SENTRY_ENVIRONMENT": "compose-test",
           "GUNICORN_WORKERS": "1", "GUNICORN_TIMEOUT": "30"}
    log = folder / "stdout.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "gunicorn"), "--config", "docker/gunicorn.conf.py",
                                 "reco_lab.service.app:app"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"gunicorn exited:\n{log.read_text()[-3000:]}"
            try:
                urllib.request.urlopen(url + "/health", timeout=1).close()
                break
            except (urllib.error.URLError, OSError):
                assert time.monotonic() < deadline, f"gunicorn did not answer:\n{log.read_text()[-3000:]}"
                time.sleep(0.2)
        yield url, log
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        sink.shutdown()


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
    expected = {"/health": 200, "/reco/popular/3": 200, "/reco/lightgbm/3": 404, "/reco/popular/abc": 422,
                "/reco/als/1332": 500, f"/reco/popular/{10**9 + 1}": 404}
    assert {path: status(url + path) for path in expected} == expected
    time.sleep(1.0)
    raw = [line for line in log.read_text().splitlines() if line.strip()]
    lines = [json.loads(line) for line in raw]  # every line is JSON: gunicorn's and uvicorn's included
    flat = [flatten(line) for line in lines]
    mapping = mapped_fields()
    filebeat_adds = set(TEMPLATE["_meta"]["added_by_filebeat"])

    carried = set().union(*flat)
    assert set(mapping) - filebeat_adds <= carried, f"mapped but never written: {set(mapping) - filebeat_adds - carried}"
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
    assert access["/reco/popular/3"]["reco.user_id"] == 3 and access["/reco/lightgbm/3"]["reco.model_name"] == "lightgbm"
    failure = next(line for line in flat if line.get("error.type") == "EmulatedFailure")
    assert failure["log.level"] == "error" and "recommend" in failure["error.stack_trace"]
    assert any(line["log.logger"] == "gunicorn.error" for line in flat)
