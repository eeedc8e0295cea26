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

# The Ray base image runs as user "ray" (uid 1000, gid 100), matching the manifests' securityContext.
WORKDIR /home/ray/madpo-ray
COPY --chown=1000:100 . .

RUN set -eux; \
    if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "$TORCH_INDEX_URL"; \
    else \
        pip install --no-cache-dir "torch==${TORCH_VERSION}"; \
    fi; \
    pip install --no-cache-dir -e ".[${EXTRAS}]"; \
    pip uninstall -y torchvision torchaudio torchcodec || true; \
    python -c "import madpo_ray, torch, ray; print('madpo-ray ready: torch', torch.__version__, 'ray', ray.__version__)"

USER 1000:100
ENV HF_HOME=/runs/.hf-cache \
    TOKENIZERS_PARALLELISM=false \
    PYTHONUNBUFFERED=1
