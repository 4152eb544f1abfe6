# Model server: the registry's champion, `models:/rlhf-policy@champion`, behind MLflow's scoring server
# (POST /invocations, GET /ping) on port 8080. Build context: the repository root.
#   docker build -f dockerfiles/serving.Dockerfile -t rlhf-serving .
# Environment it needs at run time: dockerfiles/README.md ("Environment"). No secret is baked in.
#
# The command is the repo's `rlhf model serve`: it runs `mlflow models serve -m models:/<name>@champion
# --env-manager local` with the model name from the config (tracking.registered_model_name), the tracking
# URI of the server profile (MLFLOW_TRACKING_URI) and the venv's bin first on PATH (MLflow execs uvicorn
# from PATH). The project is installed because the pyfunc model is models-from-code importing
# `components`; `--env-manager local` serves it with these packages (constraints.txt), not a new env.
# A new champion is picked up on restart. CPU inference; for a GPU, build it FROM the trainer's base.
FROM python:3.11.15-slim

# tini: PID 1 that forwards SIGTERM to the whole group (mlflow runs uvicorn as a child) and reaps children
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 rlhf \
    && useradd --system --uid 10001 --gid rlhf --create-home --home-dir /home/rlhf rlhf \
    && install -d -o rlhf -g rlhf /app /app/.rlhf /home/rlhf/.cache /home/rlhf/.cache/huggingface \
    && python -m venv /opt/venv

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

WORKDIR /app

# CPU torch first, from the PyTorch CPU index (see orchestrator.Dockerfile)
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

# the dependencies in their own layer (see trainer.Dockerfile): editable, conf/ is found next to the code
COPY constraints.txt pyproject.toml ./
RUN mkdir cli components flows service \
    && touch cli/__init__.py components/__init__.py flows/__init__.py service/__init__.py \
    && pip install --no-cache-dir -c constraints.txt -e .

COPY components ./components
COPY cli ./cli
COPY flows ./flows
COPY service ./service
COPY conf ./conf
COPY dockerfiles/healthcheck.py /usr/local/lib/rlhf/healthcheck.py

USER 10001:10001
EXPOSE 8080

# the scoring server's own liveness endpoint; the first start downloads and loads the model
HEALTHCHECK --interval=30s --timeout=10s --start-period=300s --retries=3 \
    CMD ["python", "/usr/local/lib/rlhf/healthcheck.py", "http", "http://127.0.0.1:8080/ping"]

ENTRYPOINT ["/usr/bin/tini", "-g", "--"]
CMD ["rlhf", "model", "serve", "--alias", "champion", "--host", "0.0.0.0", "--port", "8080", "tracking=server"]
