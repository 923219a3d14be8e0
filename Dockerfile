# sqsbalancerd as an ECS task: `docker build -t sqsbalancerd .`
# Add your handler code with a derived image (see README "Running on ECS").
FROM python:3.11.7-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY sqsbalancerd ./sqsbalancerd
RUN pip install --no-cache-dir . \
    && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin sqsbalancerd

USER 10001

# JSON logs for CloudWatch; /metrics, /healthz, /readyz on 9400 inside the task.
ENV SQSBALANCERD_OBSERVABILITY__LOG_FORMAT=json \
    SQSBALANCERD_OBSERVABILITY__HTTP_HOST=0.0.0.0
EXPOSE 9400

STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["sqsbalancerd", "health"]

ENTRYPOINT ["sqsbalancerd"]
CMD ["run"]
