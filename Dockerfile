# monosemantic: the service on the shipped reference model and dictionary, HTTP on 8000 and gRPC on 50051.
#   docker build -t monosemantic .                         # CPU (default)
#   docker build -t monosemantic:cuda --build-arg BASE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 .   # CUDA; run with MONOSEMANTIC_DEVICE=cuda
ARG BASE=python:3.11-slim
FROM ${BASE}

ARG TORCH_VERSION=2.5.1
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 MONOSEMANTIC_HOST=0.0.0.0

# The CUDA base images have no pip; the slim Python image has everything already.
RUN if ! command -v pip >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python-is-python3 \
        && rm -rf /var/lib/apt/lists/*; \
    fi
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

RUN useradd --create-home --uid 10001 monosemantic
WORKDIR /opt/monosemantic
COPY pyproject.toml README.md hatch_build.py ./
COPY proto ./proto
COPY monosemantic ./monosemantic
COPY trainer ./trainer
COPY service ./service
COPY artifacts ./artifacts
# A regular (non-editable) install: the gRPC stubs are generated from proto/ and the shipped reference is packaged.
RUN pip install . && rm -rf /opt/monosemantic/build

USER monosemantic
EXPOSE 8000 50051
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD python -c "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"
ENTRYPOINT ["monosemantic-serve"]
