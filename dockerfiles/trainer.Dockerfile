# GPU worker: runs the training stages (SFT, reward model, PPO, evaluation) that the orchestrator
# dispatches to the Prefect work pool `gpu`. Build context: the repository root.
#   docker build -f dockerfiles/trainer.Dockerfile -t rlhf-trainer .
# Environment it needs at run time: dockerfiles/README.md ("Environment"). No secret is baked in.
#
# CUDA choice: torch 2.13.0 from the PyTorch cu129 wheel index (CUDA 12.9). The wheel brings its own
# CUDA runtime, cuDNN and NCCL as nvidia-* packages; the base image matches them (12.9, cuDNN) and sets
# the NVIDIA container toolkit variables. cu129 rather than PyPI's default torch build (CUDA 13.0):
# CUDA 12 wheels run on any R525+ driver (minor-version compatibility), CUDA 13 needs an R580+ driver.
# For CUDA 13 hosts use the cu130 index with nvidia/cuda:13.0.x-cudnn-runtime-ubuntu24.04.
FROM nvidia/cuda:12.9.1-cudnn-runtime-ubuntu24.04

ARG DEBIAN_FRONTEND=noninteractive
# python3 is Ubuntu 24.04's 3.12 (every version in constraints.txt has a 3.12 wheel or is pure Python);
# git: a stage records the code's commit with `git rev-parse` ("unknown" outside a checkout);
# tini: PID 1 that forwards SIGTERM (a stopped worker ends its flow run as Crashed) and reaps children
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv git tini ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 rlhf \
    && useradd --system --uid 10001 --gid rlhf --create-home --home-dir /home/rlhf rlhf \
    && install -d -o rlhf -g rlhf /app /app/.rlhf /srv/dvc-remote /home/rlhf/.cache /home/rlhf/.cache/huggingface \
    && python3 -m venv /opt/venv

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

WORKDIR /app

# torch with CUDA first, from the PyTorch index (PyPI's torch is another build); constraints.txt pins
# torch==2.13.0, which 2.13.0+cu129 satisfies, so the project install below keeps this build
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cu129 torch==2.13.0

# the dependencies in their own layer (rebuilt only when pyproject.toml or constraints.txt change):
# an editable install of empty packages; the code copied next is what it then imports (conf/ is found
# next to the code, so the install must stay editable)
COPY constraints.txt pyproject.toml ./
RUN mkdir cli components flows service \
    && touch cli/__init__.py components/__init__.py flows/__init__.py service/__init__.py \
    && pip install --no-cache-dir -c constraints.txt -e .

# code and config read-only (root-owned); the DVC files writable by the worker, which pulls data/
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

# mount volumes on /app/.rlhf (stage outputs and checkpoints: a restarted worker resumes),
# /srv/dvc-remote (compose's shared DVC remote; an s3:// URL in production) and
# /home/rlhf/.cache/huggingface (hub downloads): all three owned by rlhf here
# numeric, so Kubernetes runAsNonRoot can verify it
USER 10001:10001

# healthy while the worker process runs and the Prefect API it polls answers
HEALTHCHECK --interval=30s --timeout=15s --start-period=60s --retries=3 \
    CMD ["python", "/usr/local/lib/rlhf/healthcheck.py", "process", "rlhf worker", "--prefect"]

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["rlhf", "worker", "--pool", "gpu", "infra=server", "tracking=server"]
