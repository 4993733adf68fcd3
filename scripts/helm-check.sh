#!/usr/bin/env bash
# Installs the offline Helm SDK, Kubernetes schemas and a PromQL parser (PyPI) into .venv, then
# checks the chart.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
[ -x .venv/bin/python ] || python3 -m venv .venv
if ! .venv/bin/python -c 'import helm_python, kubernetes_validate, yaml, promql_parser' >/dev/null 2>&1; then
  .venv/bin/pip install -q --disable-pip-version-check "helm-python-sdk==0.2.2" "kubernetes-validate==1.37.0" "pyyaml==6.0.3" "promql-parser==0.12.0"
fi
exec .venv/bin/python scripts/helm-check.py
