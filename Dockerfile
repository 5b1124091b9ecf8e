# druid-log-agent container image (not built by CI: docs/operations.md, "Build and push the
# image", says how to build and push it).
#
#   docker build -t druid-log-agent:0.1.0 \
#     --build-arg VERSION=0.1.0 --build-arg GIT_COMMIT="$(git rev-parse HEAD)" .
#
# VERSION and GIT_COMMIT label the image (org.opencontainers.image.version/revision) and are in
# the build's environment, for a build script that wants to bake them in. The binary does not
# read them today: `druid-log-agent --version` prints the version of Cargo.toml.

# --- build ------------------------------------------------------------------------------------
# The Rust version is Cargo.toml's rust-version. The full (not slim) image brings the C
# toolchain that aws-lc-sys (TLS for the S3 and Kubernetes clients) compiles with.
FROM rust:1.95-bookworm AS builder
WORKDIR /src

# Dependencies first, in a layer of their own: it is rebuilt only when a manifest or Cargo.lock
# changes, not on every edit of the sources. Cargo reads every workspace member's manifest and
# every target a manifest names, so each member's Cargo.toml is copied and each target cargo
# looks for gets an empty stub, at a path the real sources overwrite below (fuzz/ is not a
# member). tests/it/manifests.rs replays these steps and has cargo read the result.
COPY Cargo.toml Cargo.lock ./
COPY testkit/Cargo.toml testkit/
COPY tools/Cargo.toml tools/
RUN mkdir -p src benches testkit/src tools/src/bin \
    && touch src/lib.rs testkit/src/lib.rs \
    && for f in src/main.rs benches/hot_path.rs tools/src/bin/soak.rs; do echo 'fn main() {}' > "$f"; done
RUN cargo build --release --locked --bin druid-log-agent

# The sources. COPY keeps their modification times, which are older than the stubs' build:
# touched, so cargo rebuilds the agent instead of shipping the stub.
COPY . .
# Declared after the dependency layer: a new GIT_COMMIT there would rebuild every dependency.
ARG VERSION=0.1.0
ARG GIT_COMMIT=unknown
ENV VERSION=${VERSION} GIT_COMMIT=${GIT_COMMIT}
RUN touch src/lib.rs src/main.rs
# The agent's binary only, in release mode with Cargo.lock deciding every dependency's version:
# the workspace's test rig (testkit/) and tools (tools/: soak, bench) are not built, and the
# image holds nothing but druid-log-agent.
RUN cargo build --release --locked --bin druid-log-agent

# --- runtime ----------------------------------------------------------------------------------
# Debian slim: glibc (the binary is linked against bookworm's) and CA certificates, nothing
# else the agent uses; `kubectl exec` still has a shell to look around with.
FROM debian:bookworm-slim
ARG VERSION=0.1.0
ARG GIT_COMMIT=unknown
LABEL org.opencontainers.image.title="druid-log-agent" \
      org.opencontainers.image.description="Ships Druid peon pod logs from each node to where Druid reads task logs" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${GIT_COMMIT}"
# CA certificates for TLS to S3 and to the Kubernetes API.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=builder /src/target/release/druid-log-agent /usr/local/bin/druid-log-agent
# Root on purpose, like the DaemonSet (manifests/daemonset.yaml, runAsUser: 0): the agent reads
# the kubelet's root-owned files under /var/log/pods and writes its root-owned hostPath state
# directory. The DaemonSet drops every capability but DAC_READ_SEARCH and mounts the root
# filesystem read-only; the binary writes nothing outside its state directory (no /tmp).
# docs/operations.md ("Security") explains why a non-root user would not work.
USER 0:0
EXPOSE 8095
ENTRYPOINT ["druid-log-agent"]
CMD ["run"]
