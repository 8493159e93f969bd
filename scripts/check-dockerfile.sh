#!/usr/bin/env bash
# Static checks of the Dockerfile (no container engine here): the binary it copies is the one
# the workspace builds, the image runs as non-root, the build is locked, and the schemas the
# example config points at are in the image.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
fail() { echo "check-dockerfile: $*" >&2; exit 1; }
f=Dockerfile
bin="$(awk '/^\[\[bin\]\]/{b=1} b && /^name *=/{gsub(/[" ]/,"",$3); print $3; exit}' crates/logflow/Cargo.toml)"
[ -n "$bin" ] || fail "no [[bin]] name in crates/logflow/Cargo.toml"
grep -q -- "--locked -p logflow --bin $bin" "$f" || fail "the build stage must build the workspace's '$bin' binary with --locked"
grep -q "^COPY --from=build /src/target/release/$bin /usr/local/bin/$bin$" "$f" || fail "the image must copy target/release/$bin"
grep -q '^ENTRYPOINT \["/usr/local/bin/'"$bin"'"\]' "$f" || fail "ENTRYPOINT must run /usr/local/bin/$bin"
grep -q "^USER nonroot" "$f" || fail "the image must run as non-root"
grep -q "^FROM gcr.io/distroless/" "$f" || fail "the runtime stage should be distroless (small, no shell)"
grep -q "^COPY schemas /etc/logflow/schemas" "$f" || fail "the schemas must be in the image at /etc/logflow/schemas"
grep -q "/etc/logflow/schemas" deploy/base/config.yaml || fail "deploy/base/config.yaml must read the image's schemas"
grep -q "/etc/logflow/config/config.yaml" deploy/base/deployment.yaml || fail "the Deployment must point at the mounted config"
echo "check-dockerfile: ok ($bin)"
