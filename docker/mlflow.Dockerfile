# MLflow tracking server on PostgreSQL (psycopg2) with artifacts in S3 (boto3), as uid 10002: the server of the
# compose tracking profiles. Its build context is docker/ (see docker/.dockerignore):
#   make docker-mlflow-image             # wheels downloaded on the host into docker/wheels/; no network in the build
#   docker build -f docker/mlflow.Dockerfile -t reco-lab/mlflow:3.17.2 docker   # pip reaching PyPI instead
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY wheels/ /tmp/wheels/
RUN if ls /tmp/wheels/mlflow/*.whl >/dev/null 2>&1; then \
        printf '[global]\nno-index = true\nfind-links = /tmp/wheels/mlflow\n' > /etc/pip.conf; fi \
    && python -m venv /opt/venv
COPY mlflow-requirements.txt /tmp/mlflow-requirements.txt
RUN /opt/venv/bin/pip install -r /tmp/mlflow-requirements.txt && /opt/venv/bin/mlflow --version

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10002 mlflow && useradd --system --uid 10002 --gid mlflow --no-create-home mlflow
COPY --from=build /opt/venv /opt/venv
USER 10002:10002
WORKDIR /tmp
EXPOSE 5000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=4)"]
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
