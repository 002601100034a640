# One image for the Prefect workers (CPU and GPU pools) and the rs5m command.
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 NO_ALBUMENTATIONS_UPDATE=1 DO_NOT_TRACK=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false
WORKDIR /app
COPY . /app
RUN pip install -e ".[gpu]" s3fs==2026.9.0 && pip uninstall -y dataclasses
ENTRYPOINT ["rs5m"]
