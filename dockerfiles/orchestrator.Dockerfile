# Orchestrator (CPU): `rlhf serve` - the retrain deployment with its cron schedule and new-data trigger.
# The retrain flow validates data, gates, registers and promotes here; it dispatches the training
# stages to the Prefect work pool `gpu` (trainer.Dockerfile). Build context: the repository root.
#   docker build -f dockerfiles/orchestrator.Dockerfile -t rlhf-orchestrator .
# Environment it needs at run time: dockerfiles/README.md ("Environment"). No secret is baked in.
#
# The same image can run a Prefect process worker for a CPU pool (e.g. `default`), for flows that need
# no GPU: `prefect worker start --pool default --type process` as the command (and, for its health check,
# `healthcheck.py process "prefect worker" --prefect`).
FROM python:3.11.15-slim

# git: a stage records the code's commit with `git rev-parse` ("unknown" outside a checkout);
# tini: PID 1 that forwards SIGTERM (`rlhf serve` then stops cleanly) and reaps children
RUN apt-get update \
    && apt-get install -y --no-install-recommends git tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 rlhf \
    && useradd --system --uid 10001 --gid rlhf --create-home --home-dir /home/rlhf rlhf \
    && install -d -o rlhf -g rlhf /app /app/.rlhf /srv/dvc-remote \
    && python -m venv /opt/venv

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

WORKDIR /app

# CPU torch first, from the PyTorch CPU index: PyPI's torch would pull GBs of CUDA wheels.
# constraints.txt pins torch==2.13.0, which 2.13.0+cpu satisfies, so the install below keeps it
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

# the dependencies in their own layer (see trainer.Dockerfile): editable, conf/ is found next to the code
COPY constraints.txt pyproject.toml ./
RUN mkdir cli components flows service \
    && touch cli/__init__.py components/__init__.py flows/__init__.py service/__init__.py \
    && pip install --no-cache-dir -c constraints.txt -e .

# code and config read-only (root-owned); the DVC files writable: `rlhf ingest` versions new data
COPY components ./components
COPY cli ./cli
COPY flows ./flows
COPY service ./service
COPY conf ./conf
COPY --chown=rlhf:rlhf .dvc ./.dvc
COPY --chown=rlhf:rlhf data.dvc .dvcignore ./
COPY dockerfiles/healthcheck.py /usr/local/lib/rlhf/healthcheck.py
# no .git in the image: DVC works without an SCM
RUN python -m dvc config --local core.no_scm true \
    && chown rlhf:rlhf .dvc/config.local

# mount volumes on /app/.rlhf (state: stage outputs, caches) and /srv/dvc-remote (compose's shared DVC
# remote; an s3:// URL in production): both owned by rlhf here. Numeric user: runAsNonRoot can check it
USER 10001:10001

# healthy while `rlhf serve` runs and the Prefect API (schedule, trigger, dispatch) answers
HEALTHCHECK --interval=30s --timeout=15s --start-period=60s --retries=3 \
    CMD ["python", "/usr/local/lib/rlhf/healthcheck.py", "process", "rlhf serve", "--prefect"]

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["rlhf", "serve", "infra=server", "tracking=server"]
