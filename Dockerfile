# syntax=docker/dockerfile:1
# razor-vllm for NVIDIA GPUs: the official vLLM OpenAI server image plus the RazorAttention plugin.
#
#   docker build -t razor-vllm:gpu .
#   docker run --gpus all --ipc=host -p 8000:8000 -v /path/to/models:/models:ro \
#       -e MODEL=/models/smollm2-135m-instruct razor-vllm:gpu
#
# vLLM comes from the base image, whose version must equal the [cuda] extra of pyproject.toml
# (vllm==0.33.0, torch 2.14); it is never reinstalled. See docker/README.md for every setting.
ARG VLLM_VERSION=v0.33.0
FROM vllm/vllm-openai:${VLLM_VERSION}
ARG VLLM_VERSION

LABEL org.opencontainers.image.title="razor-vllm" \
      org.opencontainers.image.description="RazorAttention (arXiv 2407.15891) as a vLLM attention backend, CUDA build" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="vllm/vllm-openai:${VLLM_VERSION}"

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only what `pip install .` needs (see .dockerignore).
WORKDIR /opt/razor-vllm/src
COPY pyproject.toml README.md ./
COPY razor_vllm/ razor_vllm/

# razor-vllm's own dependencies (read from pyproject.toml [project].dependencies), constrained to
# the vllm and torch already in the image so nothing can upgrade them, then the project with
# --no-deps (its [cuda] extra would only name the vllm that is already here).
# PIP_BREAK_SYSTEM_PACKAGES: the image installs vLLM into the system Python on purpose.
# hadolint ignore=DL3013
RUN export PIP_BREAK_SYSTEM_PACKAGES=1 \
 && python3 -c 'import importlib.metadata as m; print("\n".join(d + "==" + m.version(d) for d in ("vllm", "torch")))' > /tmp/razor-constraints.txt \
 && python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' > /tmp/razor-deps.txt \
 && python3 -m pip install --no-cache-dir -c /tmp/razor-constraints.txt -r /tmp/razor-deps.txt \
 && python3 -m pip install --no-cache-dir --no-deps . \
 && rm -f /tmp/razor-constraints.txt /tmp/razor-deps.txt

COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/razor-vllm-entrypoint

# Serving settings; docker/entrypoint.sh turns them into `vllm serve` arguments. MODEL has no default.
ENV RAZOR_HEAD_CONFIG=smollm2-135m-instruct \
    RAZOR_WINDOW=256 \
    RAZOR_SINKS=64 \
    RAZOR_COMPENSATION=single \
    PORT=8000

# Non-root: models and head configs are mounted read-only at /models and /configs; Hugging Face
# downloads and vLLM's compile cache go under the user's home (a volume there keeps them).
RUN groupadd --gid 10001 razor \
 && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin razor \
 && mkdir -p /models /configs /home/razor/.cache/huggingface \
 && chown -R razor:razor /home/razor
# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
ENV HOME=/home/razor \
    HF_HOME=/home/razor/.cache/huggingface
WORKDIR /home/razor

# Fail the build, not the first deployment: the installed package (not the source tree), its vLLM
# plugin entry point and the default head config must all resolve for the non-root user.
RUN python3 -c "import razor_vllm, razor_vllm.vllm.plugin; from importlib.metadata import entry_points; assert any(e.value == 'razor_vllm.vllm.plugin:register' for e in entry_points(group='vllm.general_plugins')), 'vllm.general_plugins entry point razor is missing'; from razor_vllm.heads import load_head_config; load_head_config('${RAZOR_HEAD_CONFIG}')"

EXPOSE 8000
# Model loading and CUDA-graph capture take minutes; failures only count after start-period.
# Exec form (no shell): PORT is read from the container's environment at check time.
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=5)"]

ENTRYPOINT ["/usr/local/bin/razor-vllm-entrypoint"]
CMD []
