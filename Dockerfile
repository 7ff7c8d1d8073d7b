# The ray-vdr runtime image used by the KubeRay manifests in k8s/ (head, workers, job submitters, Serve replicas).
# Base: Ray's GPU image at the Ray version pyproject.toml pins; tests/k8s/test_manifests.py checks that the tag,
# the manifests' rayVersion and the installed ray agree. The repo goes to /app, the working_dir of the RayJobs, and
# ray-vdr is installed with its `gpu` extra.
#
#   docker build -t ghcr.io/ray-vdr/ray-vdr:0.1.0-ray2.60.0 .                           # with flash-attn (slow)
#   docker build --build-arg FLASH_ATTN=0 -t ghcr.io/ray-vdr/ray-vdr:0.1.0-ray2.60.0 .  # without: PyTorch sdpa
FROM rayproject/ray:2.60.0-py311-gpu

# flash-attn has no wheel on PyPI. 1 builds it from source against the image's CUDA toolkit (MAX_JOBS parallel
# compiles, up to an hour). 0 leaves it out, and the models then run PyTorch sdpa: the manifests set
# model.attn_implementation=auto, which uses flash-attn only when it is installed.
ARG FLASH_ATTN=1
ARG MAX_JOBS=8

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

USER root
RUN install -d -o ray -g users /app
USER ray
WORKDIR /app

# torch comes first: deepspeed (an sdist) and flash-attn build against the installed torch without build isolation.
# The constraints keep torch and the image's ray where they are for every later install.
RUN pip install --no-cache-dir "torch>=2.11,<2.14" \
 && python -c "import ray, torch; print(f'ray=={ray.__version__}\ntorch=={torch.__version__}')" > /home/ray/constraints.txt \
 && pip install --no-cache-dir --no-build-isolation -c /home/ray/constraints.txt "deepspeed>=0.19.8,<0.20" \
 && if [ "$FLASH_ATTN" = "1" ]; then \
      MAX_JOBS="$MAX_JOBS" pip install --no-cache-dir --no-build-isolation -c /home/ray/constraints.txt "flash-attn>=2.7"; \
    fi

COPY --chown=ray:users . /app

# ray-vdr and its `gpu` extra. Without flash-attn, the same extra minus flash-attn (the test checks both lists agree).
# faiss-gpu replaces faiss-cpu; both ship the `faiss` module, so reinstall faiss-gpu after faiss-cpu is removed.
RUN if [ "$FLASH_ATTN" = "1" ]; then \
      pip install --no-cache-dir -c /home/ray/constraints.txt ".[gpu]"; \
    else \
      pip install --no-cache-dir -c /home/ray/constraints.txt . "sentence-transformers[image]>=6.2,<7" "faiss-gpu-cu12>=1.15"; \
    fi \
 && pip uninstall -y faiss-cpu \
 && pip install --no-cache-dir --force-reinstall --no-deps "faiss-gpu-cu12>=1.15"
