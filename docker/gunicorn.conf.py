"""gunicorn settings of the service image (`gunicorn -c docker/gunicorn.conf.py reco_lab.service.app:app`).

The master loads the export (downloading it first with RECO_LAB_MODEL_URI) before it forks any worker: one download
and one verification per start, the workers share the pages, and a start that cannot finish stops gunicorn with one
line, or within RECO_LAB_START_TIMEOUT; until the workers are forked, SIGTERM ends it at once.

Every number comes from the environment, with defaults sized for a 2-core container. gunicorn's own request
limits (`limit_request_line`, `limit_request_fields`, `limit_request_field_size`) apply to its sync workers
only; `ServiceWorker` hands them, with the keep-alive timeout, to `reco_lab.service.server`, the code that
`reco-lab serve` runs too: the same limits on the request head (400 beyond them), a timeout for a head that never
completes, the concurrency limit answered with a JSON 503, and the parser chosen by RECO_LAB_HTTP.
"""

import os
import sys

from pydantic import ValidationError
from uvicorn.workers import UvicornWorker

from reco_lab.service.errors import StartupFailed, share_sentry_budget
from reco_lab.service.logging import SentryConfigError, check_sentry_dsn, log_config
from reco_lab.service.server import Limits, uvicorn_options
from reco_lab.service.settings import Settings, settings_problem


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    try:
        return int(value) if value else default
    except ValueError:
        raise SystemExit(f"gunicorn.conf.py: environment variable {name}={value!r} is not an integer") from None


# checked here, in the master: a wrong value stops gunicorn with one line instead of failing every worker's boot
try:
    SETTINGS = Settings()
    check_sentry_dsn()
except ValidationError as e:
    raise SystemExit(f"gunicorn.conf.py: invalid settings: {settings_problem(e)}") from None
except SentryConfigError as e:
    raise SystemExit(f"gunicorn.conf.py: {e}") from None
share_sentry_budget()  # one Sentry budget (RECO_LAB_SENTRY_EVENTS_PER_MINUTE) for all the workers forked from here


EXPORT = None  # loaded by the master in on_starting, inherited by every worker


def on_starting(server) -> None:
    "Load the export in the master, before gunicorn installs its signal handlers and forks the workers."
    global EXPORT
    from reco_lab.service.app import served_export

    try:
        EXPORT = served_export(SETTINGS)
    except StartupFailed:
        sys.exit(3)  # the reason is logged in one line


class ServiceWorker(UvicornWorker):
    "uvicorn worker with the service's server options (`reco_lab.service.server.uvicorn_options`), gunicorn's limits."

    def load_wsgi(self) -> None:
        super().load_wsgi()
        self.wsgi.state.export = EXPORT  # the lifespan then serves it instead of loading its own

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        settings = Settings()
        limits = Limits(
            request_line=self.cfg.limit_request_line,
            request_fields=self.cfg.limit_request_fields,
            request_field_size=self.cfg.limit_request_field_size,
            keep_alive=self.cfg.keepalive,
            header_timeout=settings.header_timeout,
            concurrency=settings.limit_concurrency,
        )
        for name, value in uvicorn_options(settings, limits).items():
            setattr(self.config, name, value)


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
limit_request_line = _env_int("GUNICORN_LIMIT_REQUEST_LINE", Limits.request_line)
limit_request_fields = _env_int("GUNICORN_LIMIT_REQUEST_FIELDS", Limits.request_fields)
limit_request_field_size = _env_int("GUNICORN_LIMIT_REQUEST_FIELD_SIZE", Limits.request_field_size)
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None  # heartbeat files off the container's disk
control_socket_disable = True  # no ~/.gunicorn/ control socket in a read-only container
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")
# the service writes one ECS line per request itself; gunicorn's own lines go through the same ECS formatter
accesslog = None
errorlog = "-"
logconfig_dict = log_config(os.environ.get("RECO_LAB_LOG_LEVEL", "INFO").upper())
