# MLflow tracking server: PostgreSQL backend store (psycopg2), basic auth (`--app-name basic-auth`),
# artifacts proxied by the server (`--serve-artifacts`) to /mlartifacts (a volume here; an object store
# such as s3://bucket/mlartifacts in production, with boto3 installed and AWS_* credentials).
# Build context: the repository root.
#   docker build -f dockerfiles/mlflow.Dockerfile -t rlhf-mlflow .
# Environment it needs at run time (dockerfiles/README.md, "Environment"): MLFLOW_BACKEND_STORE_URI,
# MLFLOW_AUTH_DATABASE_URI, MLFLOW_AUTH_ADMIN_PASSWORD (first start), MLFLOW_FLASK_SERVER_SECRET_KEY,
# MLFLOW_SERVER_ALLOWED_HOSTS. No secret is baked in: mlflow-entrypoint.sh writes the auth config at start.
FROM python:3.11.15-slim

# tini: PID 1 that forwards SIGTERM to the whole group (mlflow runs uvicorn as a child) and reaps children
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 mlflow \
    && useradd --system --uid 10001 --gid mlflow --create-home --home-dir /home/mlflow mlflow \
    && install -d -o mlflow -g mlflow /mlartifacts \
    && python -m venv /opt/venv

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

WORKDIR /srv/mlflow

# mlflow at the version constraints.txt pins (with its tested dependencies), the PostgreSQL driver, and
# the `auth` extra's Flask-WTF, which constraints.txt does not list: pinned to the versions tested with it
COPY constraints.txt ./
RUN pip install --no-cache-dir -c constraints.txt "mlflow[auth]" psycopg2-binary Flask-WTF==1.3.0 WTForms==3.3.2

COPY --chmod=0755 dockerfiles/mlflow-entrypoint.sh /usr/local/bin/mlflow-entrypoint
COPY dockerfiles/healthcheck.py /usr/local/lib/rlhf/healthcheck.py

USER 10001:10001
EXPOSE 5000

# /health needs no login and is exempt from the allowed-hosts check
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "/usr/local/lib/rlhf/healthcheck.py", "http", "http://127.0.0.1:5000/health"]

ENTRYPOINT ["/usr/bin/tini", "-g", "--", "/usr/local/bin/mlflow-entrypoint"]
# the backend store comes from MLFLOW_BACKEND_STORE_URI (it holds the database password: not a flag here)
CMD ["mlflow", "server", "--artifacts-destination", "/mlartifacts", "--serve-artifacts", "--app-name", "basic-auth", "--host", "0.0.0.0", "--port", "5000"]
