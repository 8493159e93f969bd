# logflow container image: a release build of the workspace's `logflow` binary on a distroless,
# non-root base. No engine runs on the project's machines, so CI checks this file statically
# (scripts/check-dockerfile.sh); build it where Docker runs: docker build -t logflow:0.1.0 .

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY crates ./crates
COPY integration-tests ./integration-tests
COPY schemas ./schemas
RUN cargo build --release --locked -p logflow --bin logflow

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/logflow /usr/local/bin/logflow
COPY schemas /etc/logflow/schemas
USER nonroot:nonroot
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/logflow"]
CMD ["run", "--config", "/etc/logflow/config/config.yaml"]
