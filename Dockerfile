# GPU image on NVIDIA's PyTorch container (Python 3.12, torch, Transformer Engine, Apex).
# The container's torch / TE / Apex / triton / numpy are pinned as constraints so that
# nothing below can replace them. Build: docker build -t vigos-megatron .
ARG BASE=nvcr.io/nvidia/pytorch:25.10-py3
FROM ${BASE}

WORKDIR /opt/vigos-megatron
COPY pyproject.toml README.md ./
COPY vigos_megatron ./vigos_megatron

RUN pip list --format=freeze \
      | grep -iE '^(torch|torchvision|torchaudio|transformer[-_]engine[a-z0-9_-]*|apex|triton|numpy|flash[-_]attn)==' \
      > /tmp/container-pins.txt \
 && pip install --no-cache-dir -c /tmp/container-pins.txt \
      "megatron-core==0.19.2" "transformers==5.12.1" qwen-vl-utils webdataset omegaconf einops pyarrow psutil safetensors pyyaml \
 && pip install --no-cache-dir --no-deps "megatron-bridge==0.6.2" \
 && pip install --no-cache-dir --no-deps -c /tmp/container-pins.txt -e .

COPY conf ./conf
COPY examples ./examples
COPY tools ./tools
COPY benchmarks ./benchmarks
