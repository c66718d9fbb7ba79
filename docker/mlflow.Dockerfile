# syntax=docker/dockerfile:1.7
# MLflow tracking server on PostgreSQL (psycopg2) with artifacts in S3/MinIO (boto3).
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
FROM ${PYTHON_IMAGE}
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
RUN pip install mlflow==3.17.2 psycopg2-binary==2.9.13 boto3==1.44.8 \
    && groupadd --system --gid 10002 mlflow && useradd --system --uid 10002 --gid mlflow --no-create-home mlflow
USER 10002:10002
WORKDIR /tmp
EXPOSE 5000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=4)"]
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
