"""The recommendation service against a live `reco-lab serve` over HTTP: contract, auth, Sentry envelopes, ECS
logs, start-up checks, fuzzing."""

import json
import time

import pytest
from support import demo_export, get, warm_user  # test_registry imports get from here

from reco_lab.core import free_port
from reco_lab.export import load_export
from reco_lab.service.app import MAX_USER_ID
from reco_lab.service.bench import SentrySink, ServiceFailed, live_service
from reco_lab.service.settings import FAILING_MULTIPLE

TOKEN = "t0ken-for-tests-only"
FAILING = 2 * FAILING_MULTIPLE  # a user id that fails on purpose when error emulation is on


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return demo_export(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def warm(export_dir) -> int:
    return warm_user(export_dir)


@pytest.fixture(scope="module")
def sentry():
    with SentrySink() as sink:
        yield sink


@pytest.fixture(scope="module")
def guarded(export_dir, sentry, tmp_path_factory):
    "Token on, error emulation on, Sentry to the local sink."
    env = {
        "RECO_LAB_API_TOKEN": TOKEN,
        "RECO_LAB_EMULATE_ERRORS": "1",
        "SENTRY_DSN": sentry.dsn,
        "SENTRY_ENVIRONMENT": "ci-test",
    }
    with live_service(export_dir, env=env, log=tmp_path_factory.mktemp("logs") / "guarded.log") as service:
        yield service


@pytest.fixture(scope="module")
def open_service(export_dir, tmp_path_factory):
    "No token, no emulation, and a Sentry DSN that points nowhere."
    env = {"SENTRY_DSN": f"http://key@127.0.0.1:{free_port()}/1"}
    with live_service(export_dir, env=env, log=tmp_path_factory.mktemp("logs") / "open.log") as service:
        yield service


def error_key(body) -> str:
    assert set(body) == {"errors"} and set(body["errors"][0]) == {"error_key", "error_message", "error_loc"}, body
    return body["errors"][0]["error_key"]


# --- the contract, without a token -------------------------------------------------------------------------------


def test_health_and_models(open_service):
    assert get(open_service.url + "/health")[::2] == (200, "I am alive")
    assert get(open_service.url + "/models")[::2] == (200, {"models": ["popular", "knn", "als"]})


def test_reco_gives_k_distinct_unseen_items_for_every_model(open_service, export_dir, warm):
    export = load_export(export_dir)
    row = export.row(warm)
    seen = set(export.seen_items[export.seen_indptr[row] : export.seen_indptr[row + 1]].tolist())
    for model in export.models:
        status, _, body = get(f"{open_service.url}/reco/{model}/{warm}")
        assert status == 200 and body["user_id"] == warm
        assert len(body["items"]) == 10 == len(set(body["items"])) and not seen & set(body["items"]), (model, body)
        assert body["items"] == export.recommend(model, warm, 10)


def test_cold_user_gets_the_popular_fallback(open_service, export_dir):
    status, _, body = get(f"{open_service.url}/reco/knn/999999")
    assert status == 200 and body["items"] == load_export(export_dir).popular[:10].tolist()


def test_errors_share_one_body(open_service, warm):
    status, _, body = get(f"{open_service.url}/reco/lightgbm/{warm}")
    assert (
        status == 404
        and error_key(body) == "model_not_found"
        and body["errors"][0]["error_loc"] == ["path", "model_name"]
    )
    status, _, body = get(f"{open_service.url}/reco/knn/{MAX_USER_ID + 1}")
    assert status == 404 and error_key(body) == "user_not_found"
    status, _, body = get(f"{open_service.url}/reco/knn/{MAX_USER_ID}")
    assert status == 200
    status, _, body = get(f"{open_service.url}/reco/knn/12.5")
    assert status == 422 and body["errors"][0]["error_loc"] == ["path", "user_id"]
    status, _, body = get(f"{open_service.url}/no/such/route")
    assert status == 404 and error_key(body) == "not_found"
    status, headers, body = get(f"{open_service.url}/health", method="POST")
    assert status == 405 and error_key(body) == "method_not_allowed" and "GET" in headers["allow"]


def test_emulation_off_and_dead_dsn_do_not_fail_requests(open_service):
    status, _, body = get(f"{open_service.url}/reco/knn/{FAILING_MULTIPLE}")
    assert status == 200 and len(body["items"]) == 10
    for _ in range(5):  # each captures a warning for a DSN nobody listens on: answers still come, as 404s
        assert get(f"{open_service.url}/reco/nope/1")[0] == 404


# --- the token ----------------------------------------------------------------------------------------------------


def test_token_guards_reco_and_models_but_not_health(guarded, warm):
    assert get(guarded.url + "/health")[0] == 200
    for path in ("/models", f"/reco/knn/{warm}"):
        for token in (None, "wrong", TOKEN + "x"):
            status, headers, body = get(guarded.url + path, token)
            assert (
                status == 401 and error_key(body) == "token_is_not_correct" and headers["www-authenticate"] == "Bearer"
            )
        assert get(guarded.url + path, TOKEN)[0] == 200


# --- Sentry and the ECS log ---------------------------------------------------------------------------------------


def access_line(service, path: str) -> dict:
    for _ in range(50):
        lines = [
            line
            for line in service.log_lines()
            if line.get("event", {}).get("dataset") == "reco_lab.access" and line["url"]["path"] == path
        ]
        if lines:
            return lines[-1]
        time.sleep(0.1)
    raise AssertionError(f"no access line for {path}")


def test_unknown_model_is_a_warning_event_with_tags(guarded, sentry, warm):
    path = f"/reco/lightgbm/{warm}"
    status, _, body = get(guarded.url + path, TOKEN)
    assert status == 404 and error_key(body) == "model_not_found"
    event = next(e for e in sentry.events() if e["exception"]["values"][-1]["type"] == "ModelNotFound")
    assert event["level"] == "warning" and event["environment"] == "ci-test"
    assert event["tags"]["model_name"] == "lightgbm" and str(event["tags"]["user_id"]) == str(warm)
    line = access_line(guarded, path)
    assert line["trace"]["id"] == event["contexts"]["trace"]["trace_id"]
    assert line["http"]["response"]["status_code"] == 404 and line["reco"] == {
        "model_name": "lightgbm",
        "user_id": warm,
    }


def test_emulated_failure_is_a_500_and_an_error_event_with_its_stack(guarded, sentry):
    path = f"/reco/als/{FAILING}"
    status, _, body = get(guarded.url + path, TOKEN)
    assert status == 500 and body == {
        "errors": [{"error_key": "server_error", "error_message": "internal server error", "error_loc": None}]
    }
    event = next(e for e in sentry.events(count=2) if e["exception"]["values"][-1]["type"] == "EmulatedFailure")
    assert event["level"] == "error" and event["environment"] == "ci-test"
    assert event["tags"]["model_name"] == "als" and str(event["tags"]["user_id"]) == str(FAILING)
    frames = [f["function"] for f in event["exception"]["values"][-1]["stacktrace"]["frames"]]
    assert frames[-2:] == ["get_reco", "recommend"], frames
    assert access_line(guarded, path)["trace"]["id"] == event["contexts"]["trace"]["trace_id"]


def test_no_secret_reaches_sentry(guarded, sentry):
    assert sentry.envelopes
    for envelope in sentry.envelopes:
        assert TOKEN.encode() not in envelope["raw"]
        assert "authorization" not in {k.lower() for k in envelope["headers"]}
        for event in envelope["items"]:
            headers = {k.lower(): v for k, v in event.get("request", {}).get("headers", {}).items()}
            assert headers.get("authorization") in (None, "[Filtered]"), headers


def test_one_ecs_line_per_request(open_service):
    before = len(open_service.log_lines())
    get(open_service.url + "/reco/popular/3")
    get(open_service.url + "/health")
    time.sleep(0.3)
    new = open_service.log_lines()[before:]
    assert [line["message"] for line in new] == ["GET /reco/popular/3 200", "GET /health 200"], new
    line = new[0]
    assert line["log.level"] == "info" and line["ecs.version"] and line["@timestamp"]
    assert (
        line["http"] == {"request": {"method": "GET"}, "response": {"status_code": 200}}
        and line["url"]["path"] == "/reco/popular/3"
    )
    assert (
        line["event"]["duration"] > 0
        and line["reco"] == {"model_name": "popular", "user_id": 3}
        and len(line["trace"]["id"]) == 32
    )
    assert not any(line["log"]["logger"] == "uvicorn.access" for line in open_service.log_lines())


# --- start-up -----------------------------------------------------------------------------------------------------


def start_up_errors(models_dir, tmp_path, env: dict | None = None) -> tuple[list[dict], str, str]:
    "The error lines, the whole log and the failure of a `reco-lab serve` that must not start."
    with pytest.raises(ServiceFailed) as failed:
        with live_service(models_dir, env=env, log=tmp_path / "serve.log"):
            pass
    text = (tmp_path / "serve.log").read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    return [line for line in lines if line["log.level"] == "error"], text, str(failed.value)


def test_corrupted_export_stops_start_up_with_one_message_naming_the_file(export_dir, tmp_path):
    import shutil

    broken = shutil.copytree(export_dir, tmp_path / "models")
    path = broken / "knn" / "topk.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    errors, text, failure = start_up_errors(broken, tmp_path)
    assert len(errors) == 1 and str(path) in errors[0]["message"] and "sha256" in errors[0]["message"], errors
    assert errors[0]["error"]["type"] == "ExportError" and "Traceback" not in text
    assert "exited with code 3" in failure


def test_an_export_that_passes_its_checksums_but_means_nonsense_stops_start_up(export_dir, tmp_path):
    "uint8 item ids, rewritten with a matching checksum: wrapped ids would be served; the start-up refuses them."
    import shutil

    import numpy as np

    from reco_lab.core import sha256

    broken = shutil.copytree(export_dir, tmp_path / "models")
    path = broken / "als" / "topk.npy"
    np.save(path, np.load(path).astype(np.uint8))
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["files"]["als/topk.npy"] = {"sha256": sha256(path), "bytes": path.stat().st_size}
    (broken / "manifest.json").write_text(json.dumps(manifest))
    errors, text, failure = start_up_errors(broken, tmp_path)
    assert [e["message"] for e in errors] == [
        f"cannot start: export file {path} holds uint8: item ids must be int32 "
        "or int64 (an unsigned or narrow type wraps ids around, a float is no id)"
    ]
    assert "exited with code 3" in failure


@pytest.mark.parametrize(
    "variable,value,expected",
    [
        (
            "RECO_LAB_API_TOKEN",
            "s\u00e9cret-t0ken",
            "RECO_LAB_API_TOKEN: the token has a character that is not visible",
        ),
        ("SENTRY_DSN", "garbage", "SENTRY_DSN is not a Sentry DSN (Unsupported scheme '')"),
    ],
)
def test_settings_that_cannot_work_stop_reco_lab_serve_with_one_line(export_dir, tmp_path, variable, value, expected):
    with pytest.raises(ServiceFailed) as failed:
        with live_service(export_dir, env={variable: value}, log=tmp_path / "serve.log"):
            pass
    lines = (tmp_path / "serve.log").read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"reco-lab serve: invalid settings: {expected}"), lines
    assert "t0ken" not in lines[0] and "exited with code 2" in str(failed.value)


def test_import_loads_nothing():
    """Importing the module reads no settings and starts no SDK; the app exists on first access; the export loads
    at start-up only."""
    import os
    import subprocess
    import sys

    code = (
        "import sentry_sdk, reco_lab.service.app as m\n"
        "assert 'app' not in vars(m) and not sentry_sdk.is_initialized()\n"
        "app = m.app\n"
        "assert sentry_sdk.is_initialized() and not hasattr(app.state, 'export')\n"
        "print('ok')"
    )
    env = {**os.environ, "RECO_LAB_MODELS_DIR": "/nonexistent", "SENTRY_DSN": f"http://key@127.0.0.1:{free_port()}/1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


# --- fuzzing over the OpenAPI schema ------------------------------------------------------------------------------


def test_fuzz_openapi_no_5xx(open_service):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(open_service.url + "/openapi.json")
    statuses = []
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

        @settings(max_examples=50, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=schema.as_strategy(mode))
        def check(case):
            response = case.call(base_url=open_service.url, timeout=10)
            statuses.append(response.status_code)
            assert response.status_code < 500, (case.formatted_path, response.status_code, response.text)
            if response.status_code >= 400:
                error_key(response.json())

        check()
    assert len(statuses) >= 50 and 200 in statuses
