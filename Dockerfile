# crm-chat container image.
#
#   docker build -t crm-chat:dev .
#   docker run --rm -p 8000:8000 crm-chat:dev
#
# Stages (cargo-chef, https://github.com/LukeMathWalker/cargo-chef):
#   chef     Rust toolchain + cargo-chef; every build stage starts here, so the
#            Rust version and WORKDIR are the same in all of them.
#   planner  `cargo chef prepare`: reduces the workspace to a recipe.json that
#            changes only when dependencies (Cargo.toml / Cargo.lock) change.
#   builder  `cargo chef cook`: compiles the dependencies alone (the cached layer),
#            then copies the sources and builds the `crm-chat` binary.
#   runtime  distroless cc (glibc, libgcc, CA certificates, tzdata; no shell, no
#            package manager), running as uid/gid 65532.
#
# The builder is Debian 12 (bookworm), so the runtime is distroless cc-debian12:
# the binary links against the glibc it was built with.

ARG RUST_IMAGE=rust:1-slim-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS chef
ARG CARGO_CHEF_VERSION=0.1.78
WORKDIR /app
RUN cargo install cargo-chef --locked --version "${CARGO_CHEF_VERSION}" \
    && rm -rf "${CARGO_HOME:-/usr/local/cargo}/registry"

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /app/recipe.json recipe.json
# Dependencies only: this layer is rebuilt only when recipe.json changes.
RUN cargo chef cook --release --locked --bin crm-chat --recipe-path recipe.json
COPY . .
RUN cargo build --release --locked --bin crm-chat \
    && install -D -m 0755 target/release/crm-chat /out/crm-chat

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
# Numeric ids, so Kubernetes `runAsNonRoot` can verify them (65532 = distroless "nonroot").
USER 65532:65532
ENV CHAT_SERVER__LISTEN=0.0.0.0:8000
EXPOSE 8000
# No curl in distroless: the binary checks its own /healthz.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/crm-chat", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/crm-chat"]
