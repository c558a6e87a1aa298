# Two targets: `worker` (ONNX Runtime, Faust, Redis: no TensorFlow) and `trainer` (+ TensorFlow).
FROM python:3.11-slim AS base
WORKDIR /app
COPY pyproject.toml README.md ./
COPY trendcast ./trendcast
COPY stream ./stream
COPY training ./training
COPY export ./export

FROM base AS worker
RUN pip install --no-cache-dir . && useradd --create-home trendcast
USER trendcast
EXPOSE 6066
CMD ["trendcast", "worker"]

FROM base AS trainer
RUN pip install --no-cache-dir '.[train]'
CMD ["trendcast", "train", "--help"]
