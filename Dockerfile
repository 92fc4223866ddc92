# mirrorcache: pull-through registry mirror.
#   Build: docker build -t mirrorcache .
#   Run:   docker run --read-only --tmpfs /tmp -p 5000:5000 \
#            -v mirrorcache:/var/lib/mirrorcache mirrorcache
# The base is any Debian bookworm image with or without Python: the default is the public
# python image; tests build on a local debootstrap image (--build-arg BASE_IMAGE=...).
# PIP_* build args (index URL, find-links, no-index) reach pip in the build stage only.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_NO_INDEX
ARG PIP_TRUSTED_HOST
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# A bare Debian base needs Python and venv from Debian; the python image has both.
RUN python3 -c 'import ensurepip, venv' 2>/dev/null \
 || { apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
      && rm -rf /var/lib/apt/lists/*; }
RUN python3 -m venv /opt/mirrorcache
WORKDIR /src
COPY pyproject.toml README.md ./
COPY mirrorcache ./mirrorcache
RUN /opt/mirrorcache/bin/pip install '.[speed]' \
 && /opt/mirrorcache/bin/pip uninstall -y pip

FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
ARG BASE_IMAGE
LABEL org.opencontainers.image.title="mirrorcache" \
      org.opencontainers.image.description="Pull-through caching mirror for container registries" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="https://github.com/mirrorcache/mirrorcache" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
ENV DEBIAN_FRONTEND=noninteractive
# tini as PID 1 forwards SIGTERM to mirrorcache and reaps; the python image lacks it.
RUN pkgs=""; command -v tini >/dev/null || pkgs="$pkgs tini"; \
    command -v python3 >/dev/null || pkgs="$pkgs python3"; \
    if [ -n "$pkgs" ]; then apt-get update && apt-get install -y --no-install-recommends $pkgs \
      && rm -rf /var/lib/apt/lists/*; fi \
 && groupadd --system --gid 10001 mirrorcache \
 && useradd --system --uid 10001 --gid mirrorcache --home-dir /var/lib/mirrorcache \
      --no-create-home --shell /usr/sbin/nologin mirrorcache \
 && mkdir -p /var/lib/mirrorcache /etc/mirrorcache \
 && chown mirrorcache:mirrorcache /var/lib/mirrorcache \
 && rm -rf /var/cache/apt/* /var/cache/debconf/*-old /var/log/* /usr/share/doc/* \
      /usr/share/man/* /usr/share/info/*
COPY --from=build /opt/mirrorcache /opt/mirrorcache
COPY config/docker.yaml /etc/mirrorcache/mirrorcache.yaml
ENV PATH=/opt/mirrorcache/bin:$PATH \
    MIRRORCACHE_CONFIG=/etc/mirrorcache/mirrorcache.yaml \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /var/lib/mirrorcache
VOLUME ["/var/lib/mirrorcache"]
EXPOSE 5000
# Override the URL (e.g. https://127.0.0.1:5000/healthz with TLS) with MIRRORCACHE_HEALTH_URL.
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, ssl, sys, urllib.request as u; url = os.environ.get('MIRRORCACHE_HEALTH_URL', 'http://127.0.0.1:5000/healthz'); sys.exit(u.urlopen(url, timeout=2, context=ssl._create_unverified_context()).status != 200)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--", "mirrorcache"]
CMD ["serve"]
