# crm-chat container image.
#
#   docker build -t crm-chat:dev .
#   docker run --rm -p 127.0.0.1:8000:8000 -p 127.0.0.1:9090:9090 \
#     -v crm-chat-data:/var/lib/crm-chat \
#     -e CHAT_AUTH__JWT_SECRET="$(openssl rand -base64 48)" \
#     -e CHAT_AUTH__API_KEY="$(openssl rand -base64 48)" crm-chat:dev
#
# Without Valkey the image runs the durable embedded engine: history on disk
# in /var/lib/crm-chat (a VOLUME; `-v crm-chat-data:/var/lib/crm-chat` names
# it so it outlives `docker run --rm`). CHAT_CHAT__DATA_DIR=memory keeps
# history in memory only.
#
# The image runs the `production` profile: without real secrets (at least 32
# bytes, not the public development strings) it refuses to start and says
# which variables to set. `-e CHAT_PROFILE=local` gives the development
# defaults (dev tokens, public well-known secrets): never expose that.
#
# Two listeners: 8000 public (/ws/chat, the demo page, /static/*), 9090
# internal (/api/v1, /metrics, /healthz, /readyz). Publish only 8000 to users.
#
# Stages (cargo-chef, https://github.com/LukeMathWalker/cargo-chef):
#   chef     Rust toolchain + cargo-chef on the BUILD platform; every build
#            stage starts here, so the Rust version and WORKDIR are the same in
#            all of them. For another TARGETARCH it adds that Rust target and a
#            Debian cross C toolchain (ring and the other C parts need one):
#            a multi-platform build compiles natively and cross-compiles, no
#            emulation (QEMU) runs the compiler.
#   planner  `cargo chef prepare`: reduces the workspace to a recipe.json that
#            changes only when dependencies (Cargo.toml / Cargo.lock) change.
#   builder  `cargo chef cook`: compiles the dependencies alone (the cached layer),
#            then copies the sources and builds the `crm-chat` binary. The
#            workspace's other member, the load tool in load/, is copied too
#            (cargo reads every member's manifest) but never built.
#   runtime  distroless cc (glibc, libgcc, CA certificates, tzdata; no shell, no
#            package manager) of the TARGET platform, running as uid/gid 65532.
#            It only copies the binary, so no RUN executes on the target platform.
#
# The builder is Debian 12 (bookworm), so the runtime is distroless cc-debian12:
# the binary links against the glibc it was built with.
#
# BUILDPLATFORM/TARGETARCH are set by BuildKit (docker buildx, compose v2). The
# classic builder (docker-compose v1.29) leaves them empty: the build stages
# then default to linux/amd64 and a native build for the builder's own
# architecture (on another machine: --build-arg BUILDPLATFORM=linux/arm64).

ARG RUST_IMAGE=rust:1-slim-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM --platform=${BUILDPLATFORM:-linux/amd64} ${RUST_IMAGE} AS chef
ARG CARGO_CHEF_VERSION=0.1.78
WORKDIR /app
RUN cargo install cargo-chef --locked --version "${CARGO_CHEF_VERSION}" \
    && rm -rf "${CARGO_HOME:-/usr/local/cargo}/registry"
ARG TARGETARCH
# /rust-target: the Rust target triple of TARGETARCH (default: this machine's).
# A foreign one gets `rustup target add` and Debian's cross gcc, and
# /rust-cross.env names them for cargo and the cc crate; the native path
# installs only `make` where the image lacks it (jemalloc's build needs it).
# (A separate layer from cargo-chef, which stays shared between target
# architectures.)
SHELL ["/bin/bash", "-Eeuo", "pipefail", "-c"]
# hadolint ignore=DL3008,DL3059
RUN host_arch=$(dpkg --print-architecture); arch=${TARGETARCH:-$host_arch}; \
    case "$arch" in \
      amd64) triple=x86_64-unknown-linux-gnu; gcc_pkg=gcc-x86-64-linux-gnu; prefix=x86_64-linux-gnu ;; \
      arm64) triple=aarch64-unknown-linux-gnu; gcc_pkg=gcc-aarch64-linux-gnu; prefix=aarch64-linux-gnu ;; \
      *) echo "unsupported TARGETARCH '$arch' (amd64 or arm64)" >&2; exit 1 ;; \
    esac; \
    echo "$triple" >/rust-target; \
    : >/rust-cross.env; \
    if ! command -v make >/dev/null; then \
      apt-get update; apt-get install -y --no-install-recommends make; rm -rf /var/lib/apt/lists/*; \
    fi; \
    if [[ $arch != "$host_arch" ]]; then \
      rustup target add "$triple"; \
      apt-get update; \
      apt-get install -y --no-install-recommends "$gcc_pkg" "libc6-dev-${arch}-cross"; \
      rm -rf /var/lib/apt/lists/*; \
      upper=${triple^^}; lower=${triple//-/_}; \
      printf 'export CARGO_TARGET_%s_LINKER=%s-gcc CC_%s=%s-gcc AR_%s=%s-ar\n' \
        "${upper//-/_}" "$prefix" "$lower" "$prefix" "$lower" "$prefix" >/rust-cross.env; \
    fi; \
    echo "Rust target: $triple (build host: $host_arch)"; cat /rust-cross.env

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /app/recipe.json recipe.json
# Dependencies only: this layer is rebuilt only when recipe.json changes.
RUN . /rust-cross.env \
    && cargo chef cook --release --locked --target "$(cat /rust-target)" --bin crm-chat --recipe-path recipe.json
COPY . .
RUN . /rust-cross.env \
    && target=$(cat /rust-target) \
    && cargo build --release --locked --target "$target" --bin crm-chat \
    && install -D -m 0755 "target/$target/release/crm-chat" /out/crm-chat \
    && install -d -m 0700 /out/data

FROM ${RUNTIME_IMAGE} AS runtime
# Filled in by CI (docker/metadata-action sets the same keys on published images).
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="crm-chat" \
      org.opencontainers.image.description="Real-time chat server for a CRM platform (WebSocket, embedded or Valkey engine)" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot"
COPY --from=builder /out/crm-chat /usr/local/bin/crm-chat
# The durable embedded engine's directory (chat.data_dir), owned by the
# non-root user; a volume, so history outlives the container. Unused with Valkey.
COPY --from=builder --chown=65532:65532 /out/data /var/lib/crm-chat
# Numeric ids, so Kubernetes `runAsNonRoot` can verify them (65532 = distroless "nonroot").
USER 65532:65532
# Secure by default: the production profile (real secrets required, no dev
# tokens) and the internal routes on their own port.
ENV CHAT_PROFILE=production \
    CHAT_SERVER__LISTEN=0.0.0.0:8000 \
    CHAT_SERVER__INTERNAL_LISTEN=0.0.0.0:9090 \
    CHAT_CHAT__DATA_DIR=/var/lib/crm-chat
VOLUME ["/var/lib/crm-chat"]
# 8000: public (WebSocket, demo page, static files); 9090: internal (service
# API, metrics, health).
EXPOSE 8000 9090
# No curl in distroless: the binary checks its own /healthz (on the internal
# listener when one is set).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/crm-chat", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/crm-chat"]
