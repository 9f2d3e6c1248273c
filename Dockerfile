# The gateway image: `docker build -t triton-gateway .`
# Run: docker run -p 8000:8000 -v $PWD/config/gateway.compose.yaml:/etc/gateway/gateway.yaml:ro triton-gateway
# Secrets as files: ${NAME} in the config reads the file named by NAME_FILE, e.g.
# -v $PWD/config/secrets:/run/secrets:ro -e ACME_API_KEY_FILE=/run/secrets/acme_api_key
# The base is pinned to an exact release (a floating tag rebuilds differently over time).
FROM python:3.11.14-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies and the package in one layer; the wheels need no compiler on slim.
# (README.m[d]: pyproject names README.md as the long description; the glob keeps the build
# working while it is absent.)
COPY pyproject.toml README.m[d] ./
COPY gateway ./gateway
RUN pip install . \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin gateway \
 && mkdir -p /etc/gateway

USER gateway

EXPOSE 8000

HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/live', timeout=2)"]

CMD ["gateway", "serve", "--config", "/etc/gateway/gateway.yaml"]
