# ramp on an official PyTorch CUDA image: one image for a workstation, a cloud VM or a Slurm cluster.
#
#   docker build -t ramp .
#   docker run --gpus all --init --ipc=host -v "$PWD/work:/workspace" ramp -- model=gpt2-124m
#
# ramp is installed the way the Makefile installs it: in editable mode with the same extras, under a
# constraints file that pins the image's own torch, so no dependency can swap in another build.
FROM pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime

# A C compiler: torch.compile's triton backend builds small helpers when it first runs.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/ramp
COPY pyproject.toml README.md LICENSE ./
COPY conf ./conf
COPY trainer ./trainer
COPY launch ./launch
COPY docker ./docker
RUN python -c "import torch; print('torch==' + torch.__version__)" > constraints.txt \
    && pip install --no-cache-dir -c constraints.txt -e ".[data,deepspeed,plot,bench,slurm,eval,dev]"

# Outputs, logs and caches land in /workspace: mount a host folder there to keep them.
ENV PYTHONUNBUFFERED=1 \
    RAMP_CACHE_DIR=/workspace/.cache/ramp \
    HF_HOME=/workspace/.cache/huggingface \
    RAMP_WORKDIR=/workspace
WORKDIR /workspace
ENTRYPOINT ["/opt/ramp/docker/entrypoint.sh"]
