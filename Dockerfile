# syntax=docker/dockerfile:1
# durable-chat: one stateless pod. Build: docker build -t durable-chat:0.1.0 .

# --- build: wheels for the app and its dependencies --------------------------
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Dependencies first, in their own layer: it is rebuilt only when they change.
COPY pyproject.toml README.md ./
RUN mkdir -p app workers && touch app/__init__.py workers/__init__.py \
    && pip wheel --wheel-dir /wheels .
# Then the source.
COPY app ./app
COPY workers ./workers
RUN pip wheel --no-deps --wheel-dir /wheels .

# --- run: the wheels only, as a non-root user ----------------------------------
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 CHAT_LOG_FORMAT=json
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin chat
COPY --from=build /wheels /wheels
# The version matches pyproject.toml (tests/test_deploy.py checks it).
RUN pip install --no-cache-dir --no-index --find-links /wheels durable-chat==0.1.0 \
    && rm -rf /wheels
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
# Exec form: durable-chat runs as PID 1 and receives SIGTERM itself (no
# shell in between), so the pod drains on shutdown: sockets close 1012,
# running turns finish or are committed as interrupted, exit 0.
ENTRYPOINT ["durable-chat"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
