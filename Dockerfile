# One image for listener and workers; the GPU worker adds the onnxruntime-gpu extra.
FROM python:3.11-slim-bookworm
ARG EXTRAS=""
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 AINODE_NODE__STORAGE_DIR=/var/lib/ainode \
    AINODE_WEIGHTS_DIR=/opt/ainode/weights
RUN apt-get update \
 && apt-get install -y --no-install-recommends dcmtk dicom3tools pixelmed-apps default-jre-headless \
        fonts-dejavu-core fonts-wqy-microhei \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/ainode
COPY pyproject.toml setup.cfg README.md ./
COPY node ./node
COPY pipelines ./pipelines
COPY weights ./weights
COPY config ./config
RUN pip install --no-cache-dir ".${EXTRAS}"
RUN useradd --system --home /var/lib/ainode ainode && mkdir -p /var/lib/ainode && chown ainode /var/lib/ainode
USER ainode
EXPOSE 11112 8080
ENTRYPOINT ["ainode"]
CMD ["run", "--config", "/opt/ainode/config/ainode.yaml"]
