# syntax=docker/dockerfile:1
# mirrorcache: pull-through registry mirror. Build: docker build -t mirrorcache .
# Run:  docker run -p 5000:5000 -v mirrorcache:/var/lib/mirrorcache mirrorcache

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY mirrorcache ./mirrorcache
RUN python -m pip install --no-cache-dir --upgrade pip==24.2 \
 && python -m pip wheel --no-cache-dir --wheel-dir /wheels '.[speed]'

FROM python:3.11-slim-bookworm
LABEL org.opencontainers.image.title="mirrorcache" \
      org.opencontainers.image.description="Pull-through caching mirror for container registries"
RUN groupadd --system --gid 10001 mirrorcache \
 && useradd --system --uid 10001 --gid mirrorcache --home-dir /var/lib/mirrorcache \
      --shell /usr/sbin/nologin mirrorcache \
 && mkdir -p /var/lib/mirrorcache /etc/mirrorcache \
 && chown mirrorcache:mirrorcache /var/lib/mirrorcache
COPY --from=build /wheels /wheels
RUN python -m pip install --no-cache-dir --no-index --find-links /wheels mirrorcache uvloop \
 && rm -rf /wheels
COPY config/docker.yaml /etc/mirrorcache/mirrorcache.yaml
ENV MIRRORCACHE_CONFIG=/etc/mirrorcache/mirrorcache.yaml \
    PYTHONUNBUFFERED=1
USER 10001:10001
VOLUME ["/var/lib/mirrorcache"]
EXPOSE 5000
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:5000/healthz', timeout=2).status != 200)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["mirrorcache"]
CMD ["serve"]
