# The recommendation service: gunicorn with uvicorn workers on reco_lab.service.app:app, as uid 10001.
#   make docker-image                     # wheels downloaded on the host into docker/wheels/; no network in the build
#   docker build -t reco-lab-service .    # the same, with pip reaching PyPI from the build (no wheels downloaded)
#   docker run --read-only --tmpfs /tmp -v "$PWD/models:/models:ro" -p 127.0.0.1:8080:8080 reco-lab-service
# The last stage is the runtime image, so a plain `docker build .` builds it. The export baked into the image
# instead of mounted is a build of its own: docker/baked.Dockerfile.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY docker/wheels/ /tmp/wheels/
# with the wheels of `make docker-image` every pip call below (build isolation included) stays offline
RUN if ls /tmp/wheels/service/*.whl >/dev/null 2>&1; then \
        printf '[global]\nno-index = true\nfind-links = /tmp/wheels/service\n' > /etc/pip.conf; fi \
    && python -m venv /opt/venv
COPY docker/service-requirements.txt /tmp/service-requirements.txt
RUN /opt/venv/bin/pip install -r /tmp/service-requirements.txt
# the package itself without its research dependencies (rectools, catboost, the full mlflow, jupyter): the service
# imports none of them; mlflow-skinny serves RECO_LAB_MODEL_URI (reco_lab[service,registry], pinned as tested)
COPY settings.ini setup.py pyproject.toml README.md /src/
COPY reco_lab /src/reco_lab
RUN /opt/venv/bin/pip install --no-deps /src && /opt/venv/bin/python -c "import reco_lab.service.app, reco_lab.registry"

FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    OPENBLAS_NUM_THREADS=1 \
    RECO_LAB_HOST=0.0.0.0 RECO_LAB_PORT=8080 RECO_LAB_MODELS_DIR=/models
# /models belongs to root: the service reads its export and never writes it
RUN groupadd --system --gid 10001 reco && useradd --system --uid 10001 --gid reco --no-create-home reco \
    && mkdir /models
COPY --from=build /opt/venv /opt/venv
COPY docker/gunicorn.conf.py /etc/reco-lab/gunicorn.conf.py
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('RECO_LAB_PORT', '8080'), timeout=2)"]
CMD ["gunicorn", "--config", "/etc/reco-lab/gunicorn.conf.py", "reco_lab.service.app:app"]
