#!/usr/bin/env bash
# Renders every kustomization under deploy/ (the base, each overlay, the base with each
# component) and validates each object against the Kubernetes schemas, offline (kubectl
# kustomize + kubernetes-validate). KEDA's custom resources and Google Managed Prometheus'
# PodMonitoring are not in those schemas and are skipped by kind.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
K8S_VERSION="${LOGFLOW_K8S_VERSION:-1.32.0}"
VENV="$ROOT/.venv"

command -v kubectl >/dev/null 2>&1 || { echo "validate-deploy: kubectl not found (it comes with the Cloud SDK packages)" >&2; exit 1; }
scripts/emulators.sh install   # the project's venv
if ! "$VENV/bin/python" -c "import kubernetes_validate" 2>/dev/null; then
  "$VENV/bin/pip" install --quiet --disable-pip-version-check kubernetes-validate==1.37.0
fi
out="$(mktemp -d)"
# Components cannot be rendered alone: each is rendered on the base, from a kustomization that
# kustomize wants inside the tree (it refuses absolute paths).
with="deploy/.validate-$$"
trap 'rm -rf "$out" "$with"' EXIT
for comp in deploy/components/*; do
  mkdir -p "$with/$(basename "$comp")"
  printf 'apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [../../base]\ncomponents: [../../components/%s]\n' \
    "$(basename "$comp")" > "$with/$(basename "$comp")/kustomization.yaml"
done
for dir in deploy/base deploy/overlays/* "$with"/*; do
  name="$(echo "$dir" | tr '/' '_')"
  kubectl kustomize "$dir" > "$out/$name.yaml"
  # One file per object, without the custom resources the schemas do not know.
  "$VENV/bin/python" - "$out/$name.yaml" "$out/$name" <<'PY'
import sys, yaml
src, prefix = sys.argv[1], sys.argv[2]
skip = {"ScaledObject", "TriggerAuthentication", "PodMonitoring"}
for i, doc in enumerate(d for d in yaml.safe_load_all(open(src)) if d):
    if doc.get("kind") in skip:
        continue
    with open(f"{prefix}-{i}.yaml", "w") as f:
        yaml.safe_dump(doc, f)
PY
  "$VENV/bin/kubernetes-validate" --strict --quiet -k "$K8S_VERSION" "$out/$name"-*.yaml
  echo "validate-deploy: ${dir/#$with\//deploy/base + component } ok ($(ls "$out/$name"-*.yaml | wc -l) objects)"
done
