# syntax=docker/dockerfile:1.7
# The recommendation service: gunicorn with uvicorn workers on reco_lab.service.app:app.
#   docker build -t reco-lab-service .                      # export mounted at /models at run time
#   docker build --target baked -t reco-lab-service:baked . # export from ./models baked into the image
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
COPY docker/service-requirements.txt /tmp/service-requirements.txt
RUN /opt/venv/bin/pip install -r /tmp/service-requirements.txt
# the package itself without its research dependencies (rectools, catboost, mlflow, jupyter): the service
# imports none of them
COPY settings.ini setup.py pyproject.toml README.md /src/
COPY reco_lab /src/reco_lab
RUN /opt/venv/bin/pip install --no-deps /src && /opt/venv/bin/python -c "import reco_lab.service.app"

FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    OPENBLAS_NUM_THREADS=1 \
    RECO_LAB_HOST=0.0.0.0 RECO_LAB_PORT=8080 RECO_LAB_MODELS_DIR=/models
RUN groupadd --system --gid 10001 reco && useradd --system --uid 10001 --gid reco --no-create-home reco \
    && mkdir /models && chown reco:reco /models
COPY --from=build /opt/venv /opt/venv
COPY docker/gunicorn.conf.py /etc/reco-lab/gunicorn.conf.py
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('RECO_LAB_PORT', '8080'), timeout=2)"]
CMD ["gunicorn", "--config", "/etc/reco-lab/gunicorn.conf.py", "reco_lab.service.app:app"]

# the serving export (`reco-lab run` writes it to ./models) inside the image, for hosts without a volume
FROM runtime AS baked
COPY --chown=reco:reco models /models
