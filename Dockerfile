# The appliance image: ingester, batcher and API (`appliance ingest|batch|serve`), used by
# docker-compose.yml. Two stages: the first builds the wheels, the second installs them into a
# venv with no compiler, no pip cache and no source tree, and runs as a non-root user.

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY appliance ./appliance
COPY loadtest ./loadtest
# The project's wheel and every dependency's (binary wheels from the index; nothing compiles here).
# Jinja2 renders the Alertmanager template in the config step (compose/render_config.py).
RUN pip wheel --no-cache-dir --wheel-dir /wheels . jinja2

FROM python:3.11-slim-bookworm
RUN useradd --system --uid 10001 --user-group --home-dir /app --create-home appliance
COPY --from=build /wheels /tmp/wheels
RUN python -m venv /opt/appliance \
    && /opt/appliance/bin/pip install --no-cache-dir --no-index --find-links /tmp/wheels \
        bluesky-appliance jinja2 \
    && rm -rf /tmp/wheels \
    && mkdir -p /data/parquet /config \
    && chown appliance:appliance /data/parquet /config
COPY compose/render_config.py /app/render_config.py
ENV PATH=/opt/appliance/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    APPLIANCE_LOG_FORMAT=json \
    APPLIANCE_DATA_DIR=/data/parquet
USER appliance
WORKDIR /app
CMD ["appliance", "config"]
