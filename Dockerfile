# The image the k8s/ manifests run: Ray's own base image plus this project.
#   CPU:  docker build -t madpo-ray:0.1.0-cpu --build-arg TORCH_INDEX_URL=<PyTorch CPU wheel index> .
#   GPU:  docker build -t madpo-ray:0.1.0-gpu --build-arg BASE_IMAGE=rayproject/ray:2.60.0-py311-gpu \
#                      --build-arg EXTRAS=vllm-gpu .
# Without TORCH_INDEX_URL, torch comes from PyPI (a CUDA build: right for GPU images, large for CPU ones).
ARG BASE_IMAGE=rayproject/ray:2.60.0-py311-cpu
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=""
ARG EXTRAS=vllm

# The code is owned by root and not writable by the user the image runs as ("ray", uid 1000, gid 100,
# matching the manifests' securityContext): a compromised process cannot rewrite what later
# processes import. It lives outside that user's home, whose folder the user could rename.
# Only what the package and the manifests' entrypoints need is copied (the same allowlist as
# `madpo submit`), so a key or credentials file in the build folder never lands in the image.
USER root
WORKDIR /opt/madpo-ray
COPY --chown=0:0 pyproject.toml README.md ./
COPY --chown=0:0 madpo_ray ./madpo_ray
COPY --chown=0:0 serve ./serve

RUN set -eux; \
    export PIP_ROOT_USER_ACTION=ignore; \
    if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "$TORCH_INDEX_URL"; \
    else \
        pip install --no-cache-dir "torch==${TORCH_VERSION}"; \
    fi; \
    pip install --no-cache-dir -e ".[${EXTRAS}]"; \
    pip uninstall -y torchvision torchaudio torchcodec || true; \
    chown -R 0:0 /opt/madpo-ray; \
    chmod -R u=rwX,go=rX /opt/madpo-ray; \
    python -c "import madpo_ray, torch, ray; print('madpo-ray ready: torch', torch.__version__, 'ray', ray.__version__)"

# Run unprivileged from here on (the last USER line: tests/test_k8s.py checks it).
USER 1000:100
ENV HF_HOME=/runs/.hf-cache \
    TOKENIZERS_PARALLELISM=false \
    PYTHONUNBUFFERED=1
