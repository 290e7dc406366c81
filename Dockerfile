# syntax=docker/dockerfile:1
# durable-chat: one stateless pod. Build: docker build -t durable-chat:0.1.0 .

# --- build: wheels for the app and its dependencies --------------------------
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Dependencies first, in their own layer: it is rebuilt only when
# pyproject.toml changes (not on README or source edits). Empty stand-ins
# for the packages and the readme let pip resolve the dependencies; they and
# setuptools' build/ and egg-info are removed after, because setuptools only
# copies a source file over its build/ copy when it is newer, so a stale
# empty app/__init__.py would otherwise end up in the real wheel.
COPY pyproject.toml ./
RUN mkdir -p app workers && touch app/__init__.py workers/__init__.py README.md \
    && pip wheel --wheel-dir /wheels . \
    && rm -rf app workers README.md build ./*.egg-info
# Then the source.
COPY README.md ./
COPY app ./app
COPY workers ./workers
RUN pip wheel --no-deps --wheel-dir /wheels .

# --- run: the wheels only, as a non-root user ----------------------------------
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 CHAT_LOG_FORMAT=json
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin chat
# The wheels are mounted, not copied: a COPY'd /wheels would stay in its
# layer even after rm. The version matches pyproject.toml (tests check it).
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels durable-chat==0.1.0
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
# Exec form: durable-chat runs as PID 1 and receives SIGTERM itself (no
# shell in between), so the pod drains on shutdown: sockets close 1012,
# running turns finish or are committed as interrupted, exit 0.
ENTRYPOINT ["durable-chat"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
