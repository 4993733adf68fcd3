#!/usr/bin/env python3
"""Offline checks of the Helm chart: `helm lint --strict`, values.schema.json (a good and a
bad values file), rendering with several value sets, and every rendered manifest validated
against the Kubernetes schemas; the rendered agentbridge configuration passes
`agentbridge config check`. The alerting rules are parsed as PromQL and every metric,
label and label value they name is checked against the services' code. Exits non-zero if any
check failed. Run by `make test` (through scripts/helm-check.sh, which installs the PyPI
packages it needs into .venv)."""
import copy
import glob
import json
import os
import re
import subprocess
import sys
import tempfile

import helm_python
import kubernetes_validate
import promql_parser
import yaml

CHART = "helm/agentbridge"
KUBE = "1.30.0"
failures = []


# Stand-ins for the `{env: NAME}` secrets of the chart's default configuration (a deployment
# takes them from `secretEnvFrom`); the shape matters where the configuration checks it.
ENV_STAND_INS = {"AGENTBRIDGE_REDIS_URL": "redis://127.0.0.1:6379",
                 "AGENTBRIDGE_LEDGER_URL": "postgres://agentbridge@127.0.0.1/agentbridge"}


def env_refs(node, out):
    """The NAMEs of every `{env: NAME}` in a parsed configuration."""
    if isinstance(node, dict):
        if set(node) == {"env"} and isinstance(node["env"], str):
            out.add(node["env"])
        for v in node.values():
            env_refs(v, out)
    elif isinstance(node, list):
        for v in node:
            env_refs(v, out)
    return out


def check_config(variant, doc):
    """The rendered agentbridge configuration passes `agentbridge config check`: the file's own
    validation and every service's start-up checks, as the pods would run them."""
    text = doc["data"]["agentbridge.yaml"]
    env = dict(os.environ)
    env.pop("AGENTBRIDGE_CONFIG", None)
    for name in env_refs(yaml.safe_load(text), set()):
        env[name] = ENV_STAND_INS.get(name, "stand-in-secret")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
    try:
        out = subprocess.run(["cargo", "run", "-q", "--bin", "agentbridge", "--", "config", "check", f.name],
                             env=env, capture_output=True, text=True, timeout=600)
    finally:
        os.unlink(f.name)
    check(out.returncode == 0, f"{variant}: the rendered configuration passes `agentbridge config check`"
          + ("" if out.returncode == 0 else f": {out.stdout}{out.stderr}"))


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what)
    if not cond:
        failures.append(what)
    return cond


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

# Labels Prometheus adds to every series it scrapes through a ServiceMonitor.
TARGET_LABELS = {"namespace", "job", "pod", "instance", "service", "endpoint", "container"}


def service_metrics():
    """Every metric the services register, read from services/*/src/metrics.rs: name ->
    (the service's source text, label names, is a histogram). A label set is an array of
    string literals or a `const` array in the same file; anything else is an error here, so a
    new way of declaring labels cannot slip past the alert checks."""
    shared = "".join(open(f).read() for f in glob.glob("shared/*/src/**/*.rs", recursive=True))
    metrics = {}
    for path in sorted(glob.glob("services/*/src/metrics.rs")):
        src = open(path).read()
        code = shared + "".join(open(f).read() for f in glob.glob(path.rsplit("/", 1)[0] + "/**/*.rs", recursive=True))
        consts = {m.group(1): re.findall(r'"([a-z_]+)"', m.group(2))
                  for m in re.finditer(r"const ([A-Z_]+): \[&str; \d+\] = \[([^\]]*)\];", src)}
        names = list(re.finditer(r'"(agentbridge_[a-z_]+)"', src))
        for i, m in enumerate(names):
            end = names[i + 1].start() if i + 1 < len(names) else len(src)
            tail = re.split(r"registry\.register|with_label_values|\bfn ", src[m.end():end])[0]
            found = re.search(r'&\[((?:\s*"[a-z_]+"\s*,?)*)\]|&([A-Z_]+)\b|&([a-z_]+)\b', tail)
            if found and found.group(3):
                raise SystemExit(f"{path}: labels of {m.group(1)} come from `{found.group(3)}`, which this check cannot read")
            labels = (re.findall(r'"([a-z_]+)"', found.group(1)) if found and found.group(1) is not None
                      else consts[found.group(2)] if found else [])
            histogram = "Histogram" in src[max(0, m.start() - 80):m.start()] or ".buckets(" in tail
            metrics[m.group(1)] = (code, set(labels), histogram)
    return metrics


def selectors(e, out):
    """Every vector selector in a parsed PromQL expression."""
    if isinstance(e, promql_parser.VectorSelector):
        out.append(e)
        return out
    for attr in ("lhs", "rhs", "expr", "param", "vector_selector"):
        child = getattr(e, attr, None)
        if child is not None:
            selectors(child, out)
    for arg in getattr(e, "args", None) or []:
        selectors(arg, out)
    return out


def output_labels(e):
    """The labels an alert's series keep (None: whatever its selector has)."""
    if isinstance(e, promql_parser.AggregateExpr):
        m = e.modifier
        return set() if m is None or m.type != promql_parser.AggModifierType.By else set(m.labels) - {"le"}
    if isinstance(e, promql_parser.BinaryExpr):
        return output_labels(e.lhs)
    if isinstance(e, promql_parser.Call):
        for arg in e.args:
            if not isinstance(arg, (promql_parser.NumberLiteral, promql_parser.StringLiteral)):
                return output_labels(arg)
    if isinstance(e, promql_parser.ParenExpr):
        return output_labels(e.expr)
    return None


def check_expr(what, text, metrics, services):
    """Parses one PromQL expression and checks every metric, label and label value it names
    against the services; returns the expression and the labels its selectors have, or None
    when it does not parse."""
    try:
        expr = promql_parser.parse(text)
    except ValueError as e:
        check(False, f"{what}: PromQL does not parse: {e}")
        return None
    known = set(TARGET_LABELS)
    for sel in selectors(expr, []):
        name = sel.name
        matchers = sel.matchers.matchers
        if name == "up":
            job = [m for m in matchers if m.name == "job"]
            regex = job[0].value if job and job[0].op == promql_parser.MatchOp.Re else ""
            hits = [svc for svc in services if re.fullmatch(regex, svc)]
            check(len(job) == 1 and sorted(hits) == sorted(services) and regex.count("|") == len(services) - 1,
                  f"{what}: `up` selects exactly the rendered Services ({len(hits)} of {len(services)})")
            continue
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        entry = metrics.get(name) or (metrics.get(base) if base != name and metrics.get(base, (0, 0, False))[2] else None)
        if not check(entry is not None, f"{what}: metric {name} is registered by a service"):
            continue
        code, labels, _ = entry
        labels = labels | ({"le"} if name.endswith("_bucket") else set())
        known |= labels
        for m in matchers:
            check(m.name in labels | TARGET_LABELS, f"{what}: {name} has the label {m.name}")
            if m.name in TARGET_LABELS:
                continue
            values = [m.value] if m.op in (promql_parser.MatchOp.Equal, promql_parser.MatchOp.NotEqual) else m.value.split("|")
            for v in values:
                check(f'"{v}"' in code, f"{what}: {name}{{{m.name}=\"{v}\"}} is a value the service emits")
    return expr, known


def check_rules(variant, doc, metrics, services, overrides):
    """The PrometheusRule: shape, PromQL, and every name it uses exists in the services."""
    check(doc["apiVersion"] == "monitoring.coreos.com/v1", f"{variant}: PrometheusRule apiVersion")
    rules = [r for g in doc["spec"]["groups"] for r in g["rules"]]
    names = [r["alert"] for r in rules]
    check(len(rules) >= 10 and len(set(names)) == len(names), f"{variant}: {len(rules)} alerts, names unique")
    if not overrides["prometheusRule"].get("disabled"):
        check(set(names) == RUNBOOKS, f"{variant}: docs/runbooks.md has a section for each alert and no other")
    for disabled in overrides["prometheusRule"].get("disabled", []):
        check(disabled not in names, f"{variant}: {disabled} left out as asked")
    runbook_base = overrides["prometheusRule"].get("runbookBaseUrl")
    for r in rules:
        what = f"{variant}: {r['alert']}"
        check(r["alert"] in RUNBOOKS, f"{what}: has a section in docs/runbooks.md")
        if runbook_base:
            check(r["annotations"].get("runbook_url") == f"{runbook_base}#{r['alert'].lower()}",
                  f"{what}: runbook_url links its section")
        check(r["labels"].get("severity") in ("critical", "warning"), f"{what}: severity {r['labels'].get('severity')}")
        for k, v in overrides["prometheusRule"].get("alertLabels", {}).items():
            check(r["labels"].get(k) == v, f"{what}: alert label {k}={v}")
        check(bool(r["annotations"].get("summary")) and bool(r["annotations"].get("description")),
              f"{what}: summary and description")
        parsed = check_expr(what, r["expr"], metrics, services)
        if parsed is None:
            continue
        expr, known = parsed
        out = output_labels(expr)
        for text in r["annotations"].values():
            for label in re.findall(r"\$labels\.([a-z_]+)", text):
                check(label in (known if out is None else out), f"{what}: annotation's $labels.{label} survives the expression")


# The public paths the chart's Ingresses route, and the service behind each. Both must match
# the code: the normalizer's webhook route, and the prefix config check demands of
# `dispatcher.callback_path`.
ENTRY_POINTS = {"/ingest/": "normalizer", "/callbacks/": "callback-dispatcher"}
check('route("/ingest/{source}"' in open("services/normalizer/src/ingress.rs").read()
      and 'callback_path.starts_with("/callbacks/")' in open("shared/config/src/dispatcher.rs").read(),
      "the Ingress paths /ingest/ and /callbacks/ are the ones the services serve")

# The alerts docs/runbooks.md explains: one `## <alert name>` section each.
RUNBOOKS = set(re.findall(r"^## (Agentbridge[A-Za-z]+)$", open("docs/runbooks.md").read(), re.M))

metrics = service_metrics()
check(len(metrics) >= 30 and metrics["agentbridge_metering_tokens_total"][1] >= {"agent", "kind"}
      and sorted(n for n, m in metrics.items() if m[2]) == sorted(n for n in metrics if n.endswith(("_seconds", "_credits")) and "budget" not in n)
      and metrics["agentbridge_normalizer_in_flight_events"][1] == set(),
      f"read {len(metrics)} metrics and their labels from services/*/src/metrics.rs")

def check_dashboard(variant, doc, metrics):
    """The Grafana dashboard ConfigMap: valid JSON, and every query checked like the alerts
    (Grafana's `$__rate_interval` stands in as 5m; `$namespace` is a plain label value)."""
    dash = json.loads(doc["data"]["agentbridge.json"])
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    check(dash.get("uid") == "agentbridge" and len(set(ids)) == len(ids), f"{variant}: dashboard uid, panel ids unique")
    check({v["name"] for v in dash["templating"]["list"]} == {"datasource", "namespace"},
          f"{variant}: dashboard variables datasource and namespace")
    namespace_query = dash["templating"]["list"][1]["definition"]
    found = re.fullmatch(r"label_values\((agentbridge_[a-z_]+), namespace\)", namespace_query)
    check(found is not None and found.group(1) in metrics, f"{variant}: namespace variable reads a registered metric")
    queries = 0
    for p in panels:
        if p["type"] == "row":
            continue
        what = f"{variant}: dashboard panel {p['title']!r}"
        check(bool(p.get("targets")), f"{what}: has queries")
        for t in p.get("targets", []):
            queries += 1
            parsed = check_expr(what, t["expr"].replace("$__rate_interval", "5m"), metrics, [])
            if parsed is None:
                continue
            expr, known = parsed
            out = output_labels(expr)
            for label in re.findall(r"\{\{\s*([a-z_]+)\s*\}\}", t.get("legendFormat", "")):
                check(label in (known if out is None else out), f"{what}: legend's {{{{{label}}}}} survives the query")
    check(queries >= 20, f"{variant}: dashboard has {queries} queries")


variants = {
    "defaults": {},
    "all-features": {
        "serviceMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True, "disabled": ["AgentbridgeTriggerSlow"], "alertLabels": {"team": "platform"},
                           "runbookBaseUrl": "https://git.example.com/agentbridge/blob/main/docs/runbooks.md"},
        "secretEnvFrom": ["agentbridge-secrets"],
        "env": {"AGENTBRIDGE__TRANSPORT__PREFIX": "prod."},
        "services": {"normalizer": {"autoscaling": {"enabled": False}, "replicas": 3}},
        "ingress": {"className": "nginx", "normalizer": {"enabled": True, "tlsSecret": "hooks-tls"},
                    "callback-dispatcher": {"enabled": True, "annotations": {"example.com/limit": "10"}}},
    },
    # Every alert (all-features leaves one out) and the Grafana dashboard.
    "monitoring": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True},
                   "grafanaDashboard": {"enabled": True}},
}

# The rule checks must catch what they are for: a misspelt metric, a label value no service
# emits, a label the metric does not have, and an annotation naming a label the sum dropped.
bad_rule = {
    "apiVersion": "monitoring.coreos.com/v1",
    "spec": {"groups": [{"name": "x", "rules": [
        {"alert": "AgentbridgeBad", "labels": {"severity": "warning"},
         "annotations": {"summary": "{{ $labels.agent }}", "description": "d"},
         "expr": 'sum by (reason) (increase(agentbridge_trigger_worker_dead_letters_total{reason="callback_timed_out", source="x"}[5m]))'
                 ' + sum(agentbridge_trigger_worker_event_total)'},
    ]}]},
}
before = len(failures)
print("(the next checks must fail: they are run on a deliberately broken rule)")
check_rules("broken-rule", bad_rule, metrics, [], {"prometheusRule": {}})
caught = failures[before:]
del failures[before:]
check(any("event_total is registered" in f for f in caught) and any("callback_timed_out" in f for f in caught)
      and any("has the label source" in f for f in caught) and any("$labels.agent" in f for f in caught),
      f"the rule checks catch a misspelt metric, an unknown label value and label, a dropped label ({len(caught)} caught)")

before = len(failures)
print("(the next check must fail: it is run on a configuration without callback secrets)")
check_config("broken-config", {"data": {"agentbridge.yaml": "transport: {kind: kafka}\n"}})
caught = failures[before:]
del failures[before:]
check(any("callback-dispatcher: dispatcher.secrets" in f for f in caught),
      "the configuration check catches a configuration a service would refuse to start with")

for name, overrides in variants.items():
    values = chart.merge_values(overrides) if hasattr(chart, "merge_values") else overrides
    chart.validate_schema(values)
    rendered = chart.render(values, name="ab", namespace="agents")
    kinds = []
    hpas = []
    docs = [doc for _, text in sorted(rendered.items()) for doc in yaml.safe_load_all(text) if doc]
    services = [d["metadata"]["name"] for d in docs if d["kind"] == "Service"]
    for doc in docs:
        kinds.append(doc["kind"])
        if doc["kind"] == "HorizontalPodAutoscaler":
            hpas.append(doc["metadata"]["name"])
        if doc["kind"] == "PrometheusRule":
            # A CRD as well; its rules are checked against the services' metrics.
            check_rules(name, doc, metrics, services, overrides)
            continue
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"].endswith("-config"):
            check_config(name, doc)
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"].endswith("-dashboard"):
            check(doc["metadata"]["labels"].get("grafana_dashboard") == "1", f"{name}: dashboard labelled for the sidecar")
            check_dashboard(name, doc, metrics)
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
    ports = {d["metadata"]["name"]: {p["name"] for p in d["spec"]["ports"]} for d in docs if d["kind"] == "Service"}
    for ing in (d for d in docs if d["kind"] == "Ingress"):
        what = f"{name}: Ingress/{ing['metadata']['name']}"
        paths = [(r["host"], p) for r in ing["spec"]["rules"] for p in r["http"]["paths"]]
        for host, p in paths:
            backend = p["backend"]["service"]
            check(p["pathType"] == "Prefix" and ENTRY_POINTS.get(p["path"]) == ing["metadata"]["labels"]["app.kubernetes.io/component"]
                  and backend["name"] == ing["metadata"]["name"] and backend["port"]["name"] in ports.get(backend["name"], ()),
                  f"{what}: {host}{p['path']} routes to its service's http port")
            check(not any(ops.startswith(p["path"]) for ops in ("/metrics", "/healthz", "/readyz")),
                  f"{what}: {p['path']} keeps /metrics, /healthz and /readyz private")
        for tls in ing["spec"].get("tls", []):
            check(set(tls["hosts"]) == {h for h, _ in paths}, f"{what}: TLS covers its host")
    print(f"{name}: rendered {', '.join(sorted(kinds))}")
    if name == "defaults":
        check({"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap"} <= set(kinds),
              "defaults render Deployment, Service, HPA, PDB and ConfigMap")
        check(kinds.count("Deployment") == 4, "defaults deploy all four services")
        check("Ingress" not in kinds, "defaults expose nothing outside the cluster")
    elif name == "all-features":
        check(kinds.count("Ingress") == 2, "all-features: an Ingress for the normalizer and one for the callback-dispatcher")
        check("ServiceMonitor" in kinds and "PrometheusRule" in kinds and "ab-agentbridge-normalizer" not in hpas,
              "all-features: ServiceMonitor and PrometheusRule on, no normalizer HPA when its autoscaling is disabled")

print(f"{len(failures)} failed" if failures else "helm chart: all checks passed")
sys.exit(1 if failures else 0)
