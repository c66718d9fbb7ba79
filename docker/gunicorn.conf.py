"""gunicorn settings of the service image (`gunicorn -c docker/gunicorn.conf.py reco_lab.service.app:app`).

Every number comes from the environment, with defaults sized for a 2-core container. gunicorn's own request
limits (`limit_request_line`, `limit_request_fields`, `limit_request_field_size`) apply to its sync workers
only; `ServiceWorker` enforces the same three on uvicorn's h11 parser, answering 400 to a request beyond them.
"""
import os

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.workers import UvicornWorker

from reco_lab.service.logging import log_config


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    try:
        return int(value) if value else default
    except ValueError:
        raise SystemExit(f"gunicorn.conf.py: environment variable {name}={value!r} is not an integer") from None


def limited_h11(max_line: int, max_fields: int, max_field_size: int) -> type[H11Protocol]:
    "uvicorn's h11 protocol refusing a request line, header count or header size beyond the limits (0 = no limit)."

    class LimitedH11Protocol(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            next_event = self.conn.next_event

            def checked_next_event():
                event = next_event()
                if isinstance(event, h11.Request):
                    line = len(event.method) + len(event.target) + 10  # "GET <target> HTTP/1.1"
                    if (max_line and line > max_line) or (max_fields and len(event.headers) > max_fields) or (
                            max_field_size and any(len(k) + len(v) + 2 > max_field_size for k, v in event.headers)):
                        raise h11.RemoteProtocolError("request line or headers beyond the configured limits")
                return event

            self.conn.next_event = checked_next_event

    return LimitedH11Protocol


class ServiceWorker(UvicornWorker):
    "uvicorn worker with gunicorn's request limits, a bounded header buffer and no `server` header."
    CONFIG_KWARGS = {"loop": "asyncio", "http": "h11", "server_header": False,
                     "h11_max_incomplete_event_size": 65536}  # bytes buffered for an unfinished header block

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.config.http = limited_h11(self.cfg.limit_request_line, self.cfg.limit_request_fields,
                                       self.cfg.limit_request_field_size)


def _bind(host: str, port: int) -> str:
    "gunicorn's `host:port`, with an IPv6 address in brackets."
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


# inside the image every interface by default (the container's port is published on the host's 127.0.0.1)
bind = _bind(os.environ.get("RECO_LAB_HOST", "").strip() or "0.0.0.0", _env_int("RECO_LAB_PORT", 8080))
worker_class = ServiceWorker
workers = _env_int("GUNICORN_WORKERS", 2)
timeout = _env_int("GUNICORN_TIMEOUT", 30)  # a worker silent this long is killed and replaced
graceful_timeout = _env_int("GUNICORN_GRACEFUL_TIMEOUT", 20)
keepalive = _env_int("GUNICORN_KEEPALIVE", 5)
max_requests = _env_int("GUNICORN_MAX_REQUESTS", 0)
max_requests_jitter = _env_int("GUNICORN_MAX_REQUESTS_JITTER", 0)
limit_request_line = _env_int("GUNICORN_LIMIT_REQUEST_LINE", 4094)
limit_request_fields = _env_int("GUNICORN_LIMIT_REQUEST_FIELDS", 100)
limit_request_field_size = _env_int("GUNICORN_LIMIT_REQUEST_FIELD_SIZE", 8190)
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None  # heartbeat files off the container's disk
control_socket_disable = True  # no ~/.gunicorn/ control socket in a read-only container
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")
# the service writes one ECS line per request itself; gunicorn's own lines go through the same ECS formatter
accesslog = None
errorlog = "-"
logconfig_dict = log_config(os.environ.get("RECO_LAB_LOG_LEVEL", "INFO").upper())
