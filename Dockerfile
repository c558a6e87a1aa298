# Two targets: `worker` (ONNX Runtime, Faust, Redis: no TensorFlow) and `trainer` (+ TensorFlow).
# The worker stage installs the base package only (`pip install .`, no extras): pyproject's
# base dependencies hold no TensorFlow/Keras/tf2onnx, and the training/export sources are not
# even copied, so nothing in the image can import them (tests/unit/deploy/test_deploy.py checks).
FROM python:3.11-slim AS base
WORKDIR /app
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml README.md ./
COPY trendcast ./trendcast
COPY stream ./stream

FROM base AS worker
# gcc only while installing: it builds the C record writer (stream/inference/_recordfmt.c), which the
# package would otherwise skip, writing the same forecast records several times slower.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && pip install --no-cache-dir . \
    && (cd /tmp && python -c "import stream.inference._recordfmt") \
    && apt-get purge -y --auto-remove gcc libc6-dev && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home trendcast
USER trendcast
ENV TRENDCAST_WEB_PORT=6066 TRENDCAST_DATA_DIR=/tmp/trendcast-worker
EXPOSE 6066
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:6066/ready', timeout=3).status != 200)"]
CMD ["trendcast", "worker"]

FROM base AS trainer
COPY training ./training
COPY export ./export
RUN pip install --no-cache-dir '.[train]'
CMD ["trendcast", "train", "--help"]
