#!/usr/bin/env python3
"""Offline checks of the Helm chart: `helm lint --strict`, values.schema.json (a good and a
bad values file), rendering with several value sets, and every rendered manifest validated
against the Kubernetes schemas. Exits non-zero on the first failure. Run by `make test`
(through scripts/helm-check.sh, which installs the two PyPI packages it needs into .venv)."""
import copy
import sys

import helm_python
import kubernetes_validate
import yaml

CHART = "helm/agentbridge"
KUBE = "1.30.0"
failures = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what)
    if not cond:
        failures.append(what)


report = helm_python.lint(CHART, strict=True)
errors = [m for m in report["messages"] if m["severity"] >= 2] + report.get("errors", [])
check(not errors, f"helm lint --strict ({errors or 'clean'})")

chart = helm_python.Chart.load(CHART)
defaults = yaml.safe_load(open(f"{CHART}/values.yaml"))

bad = copy.deepcopy(defaults)
bad["services"]["normalizer"]["port"] = "eighty"
try:
    chart.validate_schema(bad)
    check(False, "values.schema.json rejects a non-integer port")
except helm_python.HelmValuesError as e:
    check("port" in str(e), f"values.schema.json rejects a non-integer port ({str(e).strip()[:80]})")
typo = copy.deepcopy(defaults)
typo["services"]["normaliser"] = typo["services"]["normalizer"]
try:
    chart.validate_schema(typo)
    check(False, "values.schema.json rejects an unknown service name")
except helm_python.HelmValuesError:
    check(True, "values.schema.json rejects an unknown service name")

variants = {
    "defaults": {},
    "all-features": {
        "serviceMonitor": {"enabled": True},
        "secretEnvFrom": ["agentbridge-secrets"],
        "env": {"AGENTBRIDGE__TRANSPORT__PREFIX": "prod."},
        "services": {"normalizer": {"autoscaling": {"enabled": False}, "replicas": 3}},
    },
}
for name, overrides in variants.items():
    values = chart.merge_values(overrides) if hasattr(chart, "merge_values") else overrides
    chart.validate_schema(values)
    rendered = chart.render(values, name="ab", namespace="agents")
    kinds = []
    hpas = []
    for path, text in sorted(rendered.items()):
        for doc in yaml.safe_load_all(text):
            if not doc:
                continue
            kinds.append(doc["kind"])
            if doc["kind"] == "HorizontalPodAutoscaler":
                hpas.append(doc["metadata"]["name"])
            if doc["kind"] == "ServiceMonitor":
                # A CRD: not in the Kubernetes schemas; check its shape by hand.
                check(doc["spec"]["endpoints"][0]["path"] == "/metrics", f"{name}: ServiceMonitor scrapes /metrics")
                continue
            try:
                kubernetes_validate.validate(doc, KUBE, strict=True)
                check(True, f"{name}: {doc['kind']}/{doc['metadata']['name']} valid for Kubernetes {KUBE}")
            except Exception as e:  # noqa: BLE001 - report any validation error
                check(False, f"{name}: {doc['kind']}/{doc['metadata']['name']}: {e}")
            if doc["kind"] == "Deployment":
                pod = doc["spec"]["template"]["spec"]
                c = pod["containers"][0]
                check(pod["securityContext"]["runAsNonRoot"] is True, f"{name}: pods run as non-root")
                check(c["securityContext"]["readOnlyRootFilesystem"] is True, f"{name}: read-only root filesystem")
                check(c["readinessProbe"]["httpGet"]["path"] == "/readyz", f"{name}: readiness probe on /readyz")
                check(c["livenessProbe"]["httpGet"]["path"] == "/healthz", f"{name}: liveness probe on /healthz")
                check(any(e["name"] == "AGENTBRIDGE_CONFIG" for e in c["env"]), f"{name}: config file wired")
    print(f"{name}: rendered {', '.join(sorted(kinds))}")
    if name == "defaults":
        check({"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap"} <= set(kinds),
              "defaults render Deployment, Service, HPA, PDB and ConfigMap")
        check(kinds.count("Deployment") == 4, "defaults deploy all four services")
    else:
        check("ServiceMonitor" in kinds and "ab-agentbridge-normalizer" not in hpas,
              "all-features: ServiceMonitor on, no normalizer HPA when its autoscaling is disabled")

print(f"{len(failures)} failed" if failures else "helm chart: all checks passed")
sys.exit(1 if failures else 0)
