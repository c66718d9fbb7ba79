"""Hostile input and faults against a live `reco-lab serve` and gunicorn, over real keep-alive connections
(issues 14 and 23).

A raw-socket client plays the attacker and the careless user: it sends exactly the bytes it means, pipelines
requests without reading the answers, smuggles requests behind bodies, stalls half-way and opens more connections
than the worker allows. Sentry goes to a local sink whose envelopes are read byte for byte. Each defect of the
issues has a test here; the property-based test at the end sends arbitrary path segments."""

import itertools
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import psutil
from support import ROOT, demo_export, warm_user

from reco_lab.core import console_script, free_port
from reco_lab.service.bench import LiveService, SentrySink, live_service, stop_process, wait_until_up
from reco_lab.service.logging import INT64
from reco_lab.service.server import server_stack
from reco_lab.service.settings import FAILING_MULTIPLE

TOKEN = "hostile-t0ken"
STACKS = ["h11"] + (["httptools"] if server_stack("auto")[0] == "httptools" else [])
FAILING = 2 * FAILING_MULTIPLE  # fails on purpose: the demo configuration emulates errors


# --- a raw HTTP/1.1 client --------------------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


class Connection:
    "One keep-alive HTTP/1.1 connection over a raw socket: send exact bytes, read whole Content-Length-framed answers."

    def __init__(self, url: str, timeout: float = 10.0):
        host, port = url.split("://", 1)[1].rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.buffer = b""

    def send(self, *requests: bytes) -> "Connection":
        self.sock.sendall(b"".join(requests))
        return self

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.buffer += chunk

    def response(self, head: bool = False) -> Response:
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        raw, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *lines = raw.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        if head:
            body = b""
        elif "content-length" in headers:
            body = self._exactly(int(headers["content-length"]))
        else:  # uvicorn's h11 400 comes chunked
            body = b""
            while size := int(self._line(), 16):
                body += self._exactly(size)
                self._line()
            self._line()
        return Response(int(status_line.split()[1]), headers, body)

    def _exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self._fill()
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            self._fill()
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def closed_by_server(self, timeout: float = 10.0) -> bool:
        "True once the server closes the connection (whatever it sent before), False if still open after `timeout`."
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
            return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def request(
    path: str, token: str | None = None, method: str = "GET", headers: tuple[str, ...] = (), host: str = "testserver"
) -> bytes:
    lines = [
        f"{method} {path} HTTP/1.1",
        f"Host: {host}",
        *([f"Authorization: Bearer {token}"] if token else []),
        *headers,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def encode(segment: str | bytes) -> str:
    "Percent-encode every byte of a path segment (lone surrogates become the invalid UTF-8 they would be on the wire)."
    raw = segment if isinstance(segment, bytes) else segment.encode("utf-8", "surrogatepass")
    return urllib.parse.quote(raw, safe="")


class Log:
    "The service's ECS lines, read as they come."

    def __init__(self, service):
        self.path, self.offset = service.log, 0

    def skip(self) -> None:
        "Ignore what was written so far (after a moment: a line is written just after its response is sent)."
        time.sleep(0.2)
        self.offset = self.path.stat().st_size

    def new(self, access: int, timeout: float = 10.0) -> list[dict]:
        "The lines written since the last call, once at least `access` of them are access lines."
        deadline = time.monotonic() + timeout
        while True:
            data = self.path.read_bytes()[self.offset :]
            complete = data[: data.rfind(b"\n") + 1]
            lines = [json.loads(line) for line in complete.splitlines() if line.startswith(b"{")]
            if len(access_lines(lines)) >= access or time.monotonic() > deadline:
                self.offset += len(complete)
                return lines
            time.sleep(0.01)


def access_lines(lines: list[dict]) -> list[dict]:
    return [line for line in lines if line.get("event", {}).get("dataset") == "reco_lab.access"]


def problems(lines: list[dict]) -> list[dict]:
    "Lines no hostile request may cause: errors other than the emulated failure, uvicorn's crash reports."
    return [
        line
        for line in lines
        if (line["log.level"] in ("error", "critical") and line.get("error", {}).get("type") != "EmulatedFailure")
        or "Exception in ASGI application" in line.get("message", "")
    ]


# --- services ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return demo_export(tmp_path_factory.mktemp("export"))


@contextmanager
def live_gunicorn(export_dir: Path | None, *, env: dict, log: Path, workers: int = 2, timeout: float = 90):
    "gunicorn with `docker/gunicorn.conf.py` as the image runs it, on a free port, until the block ends."
    port = free_port()
    environ = {
        **os.environ,
        "SENTRY_DSN": "",
        "RECO_LAB_HOST": "127.0.0.1",
        "RECO_LAB_PORT": str(port),
        "GUNICORN_WORKERS": str(workers),
        **({"RECO_LAB_MODELS_DIR": str(export_dir)} if export_dir else {}),
        **env,
    }
    command = [console_script("gunicorn"), "--config", "docker/gunicorn.conf.py", "reco_lab.service.app:app"]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=environ, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until_up(f"http://127.0.0.1:{port}", process, log, timeout)
        deadline = time.monotonic() + timeout
        while log.read_text().count("Application startup complete") < workers and time.monotonic() < deadline:
            time.sleep(0.1)  # every worker ready, not only the first
        yield LiveService(f"http://127.0.0.1:{port}", process, log)
    finally:
        stop_process(process, timeout=30)


def on_stack(export_dir, stack: str, logs, name: str, env: dict):
    "`live_service` on the HTTP stack `stack` (gunicorn: its image configuration), its log `<name>-<stack>.log`."
    if stack == "gunicorn":
        return live_gunicorn(export_dir, env=env, log=logs / f"{name}-{stack}.log")
    return live_service(export_dir, env=env, args=("--http", stack), log=logs / f"{name}-{stack}.log")


def workers(service) -> list[psutil.Process]:
    "The processes that answer requests: uvicorn's single process, or gunicorn's workers."
    process = psutil.Process(service.pid)
    return process.children() or [process]


@pytest.fixture(scope="module")
def warm(export_dir) -> int:
    return warm_user(export_dir)


@pytest.fixture(scope="module", params=STACKS)
def hostile(request, export_dir, tmp_path_factory):
    "The demo configuration at its most exposed: token, error emulation, Sentry to a local sink; on each HTTP stack."
    with SentrySink() as sink:
        env = {
            "RECO_LAB_API_TOKEN": TOKEN,
            "RECO_LAB_EMULATE_ERRORS": "1",
            "SENTRY_DSN": sink.dsn,
            "SENTRY_ENVIRONMENT": "hostile",
        }
        with on_stack(export_dir, request.param, tmp_path_factory.mktemp("logs"), "hostile", env) as service:
            service.sink, service.stack = sink, request.param
            yield service


def sentry_types(sink: SentrySink) -> list[str]:
    time.sleep(0.5)  # the SDK sends from a background thread
    return [
        item["exception"]["values"][-1]["type"]
        for envelope in sink.envelopes
        for item in envelope["items"]
        if item.get("exception")
    ]


# --- 1. the access log: only the user id FastAPI validated ------------------------------------------------------

FAMILY = [
    "--1",
    "²",
    "①",
    "₁",
    "١",
    "１",
    "1.5",
    "abc",
    "0x10",
    "1e3",
    "--0",
    "-" * 50 + "1",
]  # 4300+ digits: see the request limits


@pytest.mark.parametrize("token", [TOKEN, None], ids=["token", "401"])
def test_segments_that_crashed_the_access_log_are_answered_logged_and_the_connection_survives(hostile, warm, token):
    log = Log(hostile)
    log.skip()
    with Connection(hostile.url) as conn:
        for segment in FAMILY:
            conn.send(request(f"/reco/knn/{encode(segment)}", token), request(f"/reco/knn/{warm}", TOKEN))
            first, second = conn.response(), conn.response()
            assert first.status == (422 if token else 401), (segment, first)
            assert second.status == 200 and second.json()["user_id"] == warm, segment
    lines = log.new(access=2 * len(FAMILY))
    access = access_lines(lines)
    assert [line["http"]["response"]["status_code"] for line in access] == [422 if token else 401, 200] * len(FAMILY)
    assert all("user_id" not in line["reco"] for line in access[::2]), access[::2]  # nothing validated, nothing logged
    assert all(line["reco"]["user_id"] == warm for line in access[1::2])
    assert not problems(lines), problems(lines)
    assert "ValueError" not in sentry_types(hostile.sink)


def test_ids_are_logged_as_validated_and_only_within_int64(hostile, warm):
    log = Log(hostile)
    log.skip()
    cases = {
        "1_000": (200, 1000),
        "+7": (200, 7),
        "0": (200, 0),
        "-1": (404, -1),
        str(INT64 - 1): (404, INT64 - 1),
        str(INT64): (404, None),
        "9" * 4000: (404, None),
        str(-INT64 - 1): (404, None),
    }
    with Connection(hostile.url) as conn:
        for segment, (status, _) in cases.items():
            answer = conn.send(request(f"/reco/popular/{segment}", TOKEN)).response()
            assert answer.status == status, (segment, answer)
            if status == 404:
                assert answer.json()["errors"][0]["error_key"] == "user_not_found"
    access = access_lines(log.new(access=len(cases)))
    assert [line["reco"].get("user_id") for line in access] == [logged for _, logged in cases.values()]


# --- 2. Sentry cannot be made to starve the worker --------------------------------------------------------------


def test_an_unknown_model_flood_sends_at_most_the_budget_and_no_large_locals(export_dir, warm, tmp_path):
    with SentrySink() as sink:
        env = {"SENTRY_DSN": sink.dsn, "RECO_LAB_SENTRY_EVENTS_PER_MINUTE": "3"}
        with live_service(export_dir, env=env, log=tmp_path / "flood.log") as service, Connection(service.url) as conn:
            start = time.monotonic()
            for i in range(60):
                assert conn.send(request(f"/reco/nosuch{i}/{warm}")).response().status == 404
            refills = int((time.monotonic() - start) / 20)  # 3 a minute: one more every 20 s
            events = sink.events(count=3)
            time.sleep(1.0)
            events = sink.events(count=3)
    assert 3 <= len(events) <= 3 + refills, len(events)
    frames = events[0]["exception"]["values"][-1]["stacktrace"]["frames"]
    local = {f["function"]: f.get("vars", {}) for f in frames}
    assert local["recommend"]["export"].startswith("Export(") and len(local["recommend"]["export"]) < 200, local[
        "recommend"
    ]
    assert events[0]["tags"] == {"model_name": "nosuch0", "user_id": str(warm)} and events[0]["level"] == "warning"


# --- 3. a 500 keeps the connection ------------------------------------------------------------------------------


def test_the_emulated_failure_answers_500_and_keeps_the_connection(hostile, warm):
    log = Log(hostile)
    log.skip()
    with Connection(hostile.url) as conn:
        conn.send(request(f"/reco/als/{FAILING}", TOKEN), request(f"/reco/als/{warm}", TOKEN), request("/health"))
        failed, after, health = conn.response(), conn.response(), conn.response()
        assert failed.status == 500 and failed.json() == {
            "errors": [{"error_key": "server_error", "error_message": "internal server error", "error_loc": None}]
        }
        assert failed.headers.get("connection") != "close"
        assert (after.status, health.status) == (200, 200)
        assert conn.send(request("/health")).response().status == 200  # still the same connection
    lines = log.new(access=4)
    errors = [line for line in lines if line["log.level"] == "error"]
    assert (
        len(errors) == 1
        and errors[0]["error"]["type"] == "EmulatedFailure"
        and "recommend" in errors[0]["error"]["stack_trace"]
    )
    assert [line["http"]["response"]["status_code"] for line in access_lines(lines)] == [500, 200, 200, 200]
    assert errors[0]["trace"]["id"] == access_lines(lines)[0]["trace"]["id"]
    assert "EmulatedFailure" in sentry_types(hostile.sink)


# --- 4. slow clients and exhaustion -----------------------------------------------------------------------------


@pytest.fixture(scope="module", params=STACKS)
def limited(request, export_dir, tmp_path_factory):
    "Small limits to reach them quickly: a head timeout of 2 s, 8 connections or requests in flight."
    env = {"RECO_LAB_HEADER_TIMEOUT": "2", "RECO_LAB_LIMIT_CONCURRENCY": "8"}
    with on_stack(export_dir, request.param, tmp_path_factory.mktemp("logs"), "limited", env) as service:
        yield service


def health_status(url: str) -> int:
    "The status of /health on a new connection, a moment after other connections closed (the worker recovers)."
    time.sleep(0.2)
    with Connection(url) as conn:
        return conn.send(request("/health")).response().status


def test_a_client_that_never_finishes_its_request_head_is_disconnected(limited):
    with Connection(limited.url) as silent, Connection(limited.url) as partial, Connection(limited.url) as idle_after:
        partial.send(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        idle_after.send(request("/health"))
        assert idle_after.response().status == 200
        idle_after.send(b"GET /health HTTP/1.1\r\n")  # a second request that stalls after its first line
        assert silent.closed_by_server() and partial.closed_by_server() and idle_after.closed_by_server()


def test_beyond_the_concurrency_limit_the_answer_is_a_json_503_and_the_worker_recovers(limited):
    log = Log(limited)
    log.skip()
    with ExitStack() as holders:
        for _ in range(8):
            holders.enter_context(Connection(limited.url))
        time.sleep(0.2)
        with Connection(limited.url) as extra:
            answer = extra.send(request("/health")).response()
            assert (answer.status, answer.headers["retry-after"], answer.headers["connection"]) == (503, "1", "close")
            assert answer.json()["errors"][0]["error_key"] == "service_unavailable"
            assert extra.closed_by_server()
    assert health_status(limited.url) == 200
    lines = log.new(access=1)
    assert sum("concurrency limit reached" in line["message"] for line in lines) == 1


def closed_now(conn: Connection) -> bool:
    "Whether the server has closed the connection already, without waiting."
    conn.sock.setblocking(False)
    try:
        return conn.sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def test_connections_beyond_the_cap_are_closed_at_once(limited):
    with ExitStack() as stack:
        conns = [stack.enter_context(Connection(limited.url)) for _ in range(40)]  # the cap: twice the limit, 16
        time.sleep(0.3)  # well within the 2 s head timeout, which would close them all
        closed = [closed_now(conn) for conn in conns]
        assert sum(closed) >= 20 and not any(closed[:10]), closed
    assert health_status(limited.url) == 200


@pytest.mark.parametrize(
    "headers,path,status",
    [
        (("X-Fine: " + "a" * 8000,), "/health", 200),
        (("X-Big: " + "a" * 9000,), "/health", 400),
        ((), "/health?q=" + "a" * 5000, 400),
        (tuple(f"X-H{i}: 1" for i in range(101)), "/health", 400),
        ((), "/reco/knn/" + "9" * 4301, 400),  # an id of more than 4300 digits no longer reaches the app
    ],
)
def test_the_request_limits_are_gunicorns(limited, headers, path, status):
    with Connection(limited.url) as conn:
        assert conn.send(request(path, headers=headers)).response().status == status


def test_running_out_of_file_descriptors_logs_little_and_the_worker_recovers(export_dir, tmp_path):
    for stack in STACKS:
        log = tmp_path / f"nofile-{stack}.log"
        with live_service(
            export_dir, args=("--http", stack), log=log, open_files=128, env={"RECO_LAB_HEADER_TIMEOUT": "2"}
        ) as service:
            host, port = service.url.split("://")[1].rsplit(":", 1)
            flood = []
            for _ in range(400):
                sock = socket.socket()
                sock.setblocking(False)
                try:
                    sock.connect((host, int(port)))
                except BlockingIOError:
                    pass
                flood.append(sock)
            time.sleep(2.0)
            for sock in flood:
                sock.close()
            wait_until_up(service.url, service.process, log, timeout=20)  # answered again, and no restart
        text = log.read_text()
        assert text.count("out of system resource") <= 2 and len(text) < 50_000, (stack, len(text))
        assert text.count("connection limit reached") <= 2


# --- 5. smaller points ------------------------------------------------------------------------------------------


def test_head_health_is_answered_without_a_body_on_a_kept_connection(hostile):
    with Connection(hostile.url) as conn:
        conn.send(request("/health", method="HEAD"), request("/health"))
        head, get = conn.response(head=True), conn.response()
        assert (
            head.status == 200 and int(head.headers["content-length"]) == len(get.body) and get.json() == "I am alive"
        )


def test_the_trailing_slash_redirect_is_gone(hostile):
    with Connection(hostile.url) as conn:
        answer = conn.send(request("/health/", host="evil.example")).response()
        assert answer.status == 404 and "location" not in answer.headers
        assert answer.json()["errors"][0]["error_key"] == "not_found"


def test_the_docs_can_be_turned_off(export_dir, tmp_path, hostile):
    with Connection(hostile.url) as conn:
        assert [conn.send(request(p)).response().status for p in ("/docs", "/redoc", "/openapi.json")] == [
            200,
            200,
            200,
        ]
    with (
        live_service(export_dir, env={"RECO_LAB_DOCS": "0"}, log=tmp_path / "nodocs.log") as service,
        Connection(service.url) as conn,
    ):
        assert [conn.send(request(p)).response().status for p in ("/docs", "/redoc", "/openapi.json")] == [
            404,
            404,
            404,
        ]
        assert conn.send(request("/health")).response().status == 200


# --- property: arbitrary path segments over a kept connection ---------------------------------------------------

segments = st.one_of(
    st.text(max_size=30),
    st.binary(max_size=30),
    st.sampled_from(
        FAMILY + [str(FAILING), f"+{FAILING_MULTIPLE}", f"0{FAILING_MULTIPLE}", f"{FAILING_MULTIPLE}.0", "", ".", ".."]
    ),
    st.integers(-(10**25), 10**25).map(str),
)


def test_arbitrary_path_segments_get_one_answer_each_and_the_connection_survives(hostile, warm):
    """Each hostile request is followed by a normal one on the same connection: both answered, no 5xx but the
    emulated failure, one access line each."""
    log = Log(hostile)
    log.skip()
    seen = {"requests": 0, "statuses": set()}

    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(
        segment=segments, where=st.sampled_from(["user", "model", "path"]), token=st.booleans(), pipelined=st.booleans()
    )
    def check(segment, where, token, pipelined):
        path = {
            "user": f"/reco/als/{encode(segment)}",
            "model": f"/reco/{encode(segment)}/{warm}",
            "path": f"/{encode(segment)}",
        }[where]
        hostile_request, normal = request(path, TOKEN if token else None), request(f"/reco/knn/{warm}", TOKEN)
        with Connection(hostile.url) as conn:
            if pipelined:
                first, second = conn.send(hostile_request, normal).response(), conn.response()
            else:
                first = conn.send(hostile_request).response()
                second = conn.send(normal).response()
        seen["requests"] += 2
        seen["statuses"].add(first.status)
        assert second.status == 200 and second.json()["user_id"] == warm, (path, second)
        if first.status >= 400:
            assert set(first.json()) == {"errors"}, (path, first)
        else:
            assert first.status == 200, (path, first)
        lines = log.new(access=2)
        access = access_lines(lines)
        assert [line["http"]["response"]["status_code"] for line in access] == [first.status, 200], (path, access)
        assert not problems(lines), problems(lines)
        if first.status >= 500:
            assert first.status == 500 and any(
                line.get("error", {}).get("type") == "EmulatedFailure" for line in lines
            ), (path, lines)
        for line in access:
            user_id = line.get("reco", {}).get("user_id")
            assert user_id is None or (isinstance(user_id, int) and -INT64 <= user_id < INT64)
            if line["http"]["response"]["status_code"] in (401, 422):
                assert user_id is None, line

    check()
    time.sleep(0.3)
    assert len(access_lines(log.new(access=0, timeout=0))) == 0  # nothing after the last request: exactly one line each
    assert seen["requests"] >= 300 and {401, 404, 422} <= seen["statuses"], seen["statuses"]
    assert set(sentry_types(hostile.sink)) <= {"ModelNotFound", "EmulatedFailure"}


# --- 6. issue 23: every server stack the project runs, gunicorn's workers included ------------------------------

SERVERS = STACKS + ["gunicorn"]


@pytest.fixture(scope="module", params=SERVERS)
def server(request, export_dir, tmp_path_factory):
    "The default configuration on each server stack: uvicorn with each parser, and gunicorn as the image runs it."
    with on_stack(export_dir, request.param, tmp_path_factory.mktemp("logs"), "server", {}) as service:
        service.stack = request.param
        yield service


def rss_mb(processes: list[psutil.Process]) -> float:
    "The largest resident memory among `processes`, in MB."
    return max(p.memory_info().rss for p in processes) / 2**20


def pipelining_attack(service, path: str, connections: int = 2, megabytes: int = 13, seconds: float = 6.0):
    "Worker RSS (MB) before, at the peak of and after `connections` clients pipelining `megabytes` each, never reading."
    host, port = service.url.split("://")[1].rsplit(":", 1)
    line = f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    blob = line * (megabytes * 2**20 // len(line))
    procs = workers(service)
    before = peak = rss_mb(procs)
    with ExitStack() as stack:
        for _ in range(connections):
            sock = stack.enter_context(socket.create_connection((host, int(port))))
            threading.Thread(target=lambda s=sock: _send_quietly(s, blob), daemon=True).start()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            peak = max(peak, rss_mb(procs))
            time.sleep(0.1)
    time.sleep(2.0)  # the connections are closed: what the workers let go of
    return before, peak, rss_mb(procs)


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:  # the test closed the socket while the server was not reading
        pass


def test_clients_pipelining_without_reading_cannot_grow_a_worker(server, warm):
    """Two connections each send 13 MB of pipelined /reco requests and never read an answer: before the fix a
    worker grew by 500-800 MB and kept it (httptools, gunicorn); now it reads no more than it can answer."""
    before, peak, after = pipelining_attack(server, f"/reco/knn/{warm}")
    print(f"{server.stack}: worker RSS {before:.0f} MB before, {peak:.0f} MB at the peak, {after:.0f} MB after")
    assert peak - before < 48 and after - before < 32, (server.stack, before, peak, after)
    with Connection(server.url) as conn:  # and it answers
        answers = conn.send(*[request(f"/reco/knn/{warm}")] * 40).response(), *[conn.response() for _ in range(39)]
        assert {a.status for a in answers} == {200}


def test_a_client_that_reads_gets_every_pipelined_answer_in_order(server, warm, export_dir):
    users = [warm, 10**8, 0, warm]
    with Connection(server.url) as conn:
        conn.send(*[request(f"/reco/popular/{u}") for u in users * 50])
        got = [conn.response().json()["user_id"] for _ in range(len(users) * 50)]
    assert got == users * 50


SMUGGLED = b"GET /reco/smuggled/1 HTTP/1.1\r\nHost: x\r\n\r\n"
CHUNKED = b"0\r\n\r\n" + SMUGGLED


@pytest.mark.parametrize(
    "head,body",
    [
        (f"Content-Length: {len(CHUNKED)}\r\nTransfer-Encoding: chunked", CHUNKED),  # CL.TE / TE.CL
        ("Transfer-Encoding: chunked\r\nContent-Length: 4", CHUNKED),
        ("Transfer-Encoding: chunked", CHUNKED),
        ("Transfer-Encoding: xchunked", CHUNKED),
        ("Transfer-Encoding:\tchunked", CHUNKED),
        (f"Content-Length: {len(SMUGGLED)}", SMUGGLED),
        (f"Content-Length: {len(SMUGGLED)}\r\nContent-Length: 0", SMUGGLED),
    ],
    ids=["cl-te", "te-cl", "te", "xchunked", "te-tab", "cl-body", "two-cl"],
)
def test_smuggled_requests_are_refused_and_never_run(server, head, body):
    log = Log(server)
    log.skip()
    with Connection(server.url) as conn:
        conn.send(f"POST /health HTTP/1.1\r\nHost: x\r\n{head}\r\n\r\n".encode("latin-1") + body)
        answer = b""
        while chunk := conn.sock.recv(65536):  # until the server closes: h11's own 400 has no length
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 400 "), answer
    time.sleep(0.3)
    lines = log.new(access=0, timeout=0)
    assert not any("smuggled" in line.get("url", {}).get("path", "") for line in lines), lines


def test_an_export_truncated_on_disk_changes_nothing_for_the_running_service(export_dir, warm, tmp_path):
    """The red team truncated a matrix under the running service: SIGBUS, no log line, an empty reply. The service
    now serves what it read and verified at start-up, whatever happens to the files."""
    copy = Path(shutil.copytree(export_dir, tmp_path / "models"))
    for stack in ("httptools" if "httptools" in STACKS else "h11", "gunicorn"):
        with on_stack(copy, stack, tmp_path, "truncated", {}) as service, Connection(service.url) as conn:
            before = [conn.send(request(f"/reco/{m}/{warm}")).response().json() for m in ("popular", "knn", "als")]
            for path in copy.rglob("*.npy"):
                path.write_bytes(b"")
            after = [conn.send(request(f"/reco/{m}/{warm}")).response().json() for m in ("popular", "knn", "als")]
            assert after == before and service.process.poll() is None and all(w.is_running() for w in workers(service))
        shutil.rmtree(copy)
        copy = Path(shutil.copytree(export_dir, tmp_path / "models"))


# --- 7. issue 23: no personal data reaches Sentry ---------------------------------------------------------------

PERSONAL = {
    "Cookie": "session=c00kie-v4lue; theme=d4rk-mode",
    "X-Forwarded-For": "203.0.113.77",
    "X-Custom-Secret": "cust0m-h3ader-value",
    "User-Agent": "Agent/attacker-1.0",
}
QUERY = "t=s3cr3t%2DT0ken&email=someone%40example.org"


@pytest.fixture(params=SERVERS)
def sentried(request, export_dir, tmp_path):
    "Token, error emulation and Sentry to a sink of its own, on each server stack."
    with SentrySink() as sink:
        env = {"RECO_LAB_API_TOKEN": TOKEN, "RECO_LAB_EMULATE_ERRORS": "1", "SENTRY_DSN": sink.dsn}
        with on_stack(export_dir, request.param, tmp_path, "sentried", env) as service:
            service.sink = sink
            yield service


def test_sentry_events_carry_only_the_allow_list(sentried, warm):
    """Unknown model, emulated failure and a 422 with cookies, a forwarded address, custom headers and a query
    string: every byte of every envelope the SDK sends is read, and none of them is there."""
    headers = tuple(f"{k}: {v}" for k, v in PERSONAL.items())
    with Connection(sentried.url) as conn:
        for path in (f"/reco/nosuch/{warm}?{QUERY}", f"/reco/als/{FAILING}?{QUERY}", f"/reco/knn/abc?{QUERY}"):
            conn.send(request(path, TOKEN, headers=headers)).response()
    hostile = sentried
    events = hostile.sink.events(count=2)
    mine = [e for e in events if e["tags"].get("user_id") in (str(warm), str(FAILING))]
    assert {e["exception"]["values"][-1]["type"] for e in mine} >= {"ModelNotFound", "EmulatedFailure"}
    for event in mine:
        assert set(event["request"]) == {"method", "url"}, event["request"]
        assert event["request"]["url"] == "/reco/{model_name}/{user_id}" == event["transaction"]
        assert set(event["tags"]) == {"model_name", "user_id"} and "user" not in event
    needles = [*PERSONAL.values(), QUERY, urllib.parse.unquote(QUERY), "s3cr3t", "someone", TOKEN, "c00kie", "d4rk"]
    raw = b"".join(envelope["raw"] for envelope in hostile.sink.envelopes)
    found = {needle for needle in needles if needle.encode() in raw or needle.lower().encode() in raw.lower()}
    assert not found, found


def test_the_client_address_reaches_sentry_only_when_configured(export_dir, warm, tmp_path):
    for configured in (False, True):
        with SentrySink() as sink:
            env = {"SENTRY_DSN": sink.dsn, "RECO_LAB_SENTRY_CLIENT_ADDRESS": str(int(configured))}
            with live_service(export_dir, env=env, log=tmp_path / f"address-{configured}.log") as service:
                with Connection(service.url) as conn:
                    conn.send(request(f"/reco/nosuch/{warm}", headers=("X-Forwarded-For: 203.0.113.78",))).response()
                (event,) = sink.events()
        raw = b"".join(envelope["raw"] for envelope in sink.envelopes)
        assert (b"203.0.113.78" in raw) == configured
        assert event["request"].get("env", {}).get("REMOTE_ADDR") == ("203.0.113.78" if configured else None)


def test_gunicorn_workers_share_one_sentry_budget(export_dir, warm, tmp_path):
    "With 2 workers and a budget of 3 a minute, 10 unknown-model requests to each send 3 events in all, not 6."
    with SentrySink() as sink:
        env = {"SENTRY_DSN": sink.dsn, "RECO_LAB_SENTRY_EVENTS_PER_MINUTE": "3"}
        with live_gunicorn(export_dir, env=env, log=tmp_path / "budget.log", workers=2) as service:
            start, answered = time.monotonic(), set()
            for asked, other in itertools.permutations(workers(service)):
                other.suspend()  # the kernel hands every new connection to the worker still running
                try:
                    for i in range(10):
                        with Connection(service.url) as conn:
                            assert conn.send(request(f"/reco/nosuch{asked.pid}-{i}/{warm}")).response().status == 404
                finally:
                    other.resume()
                time.sleep(0.3)
                answered = {line["process"]["pid"] for line in access_lines(service.log_lines())}
            refills = int((time.monotonic() - start) / 20)
            time.sleep(1.5)
            events = sink.events(count=3)
    assert len(answered) == 2, answered  # both workers answered
    assert 3 <= len(events) <= 3 + refills, len(events)
