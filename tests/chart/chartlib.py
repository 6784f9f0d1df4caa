"""Helpers of the chart tests (tests/chart/test_chart*.py): object lookups, the bad-values runner and the
NetworkPolicy readers (which peers a rule lets in or out)."""

from __future__ import annotations

import ipaddress

import pytest
import yaml

from workbench.kubernetes.hub import singleuser_labels
from workbench.policy import parse_policy

from .conftest import (
    PRODUCTION,
    RELEASE,
    RenderError,
    find,
    helm_template,
    one,
)

OAUTH_SECRET = {
    ("workbench-oauth", "client-secret"): "s3cret",
    ("workbench-hub-db", "url"): "postgresql+psycopg://x",
    ("workbench-quota-db", "url"): "postgresql+psycopg://quota@db/quota",
}
#: components whose pods use the Kubernetes API, and so get a service account token
API_USERS = {"hub", "gateway-api", "gateway-controller", "gateway-proxy", "jobs"}
#: every component with pods of its own (a Deployment)
COMPONENTS = (
    "hub",
    "proxy",
    "gateway-api",
    "gateway-controller",
    "gateway-proxy",
    "gateway-guard",
    "quota",
    "sessions",
    "rosters",
    "jobs",
)
TRAEFIK_KINDS = {"IngressRoute", "Middleware"}


def component(obj: dict) -> str:
    return obj["metadata"]["labels"]["app.kubernetes.io/component"]


def pod_specs(objects):
    for dep in find(objects, "Deployment"):
        yield component(dep), dep["spec"]["template"]["spec"]


def platform_policy(objects):
    cm = one(objects, "ConfigMap", f"{RELEASE}-platform")
    return parse_policy(yaml.safe_load(cm["data"]["platform.yaml"]), source="ConfigMap")


def expect_failure(helm, *args) -> str:
    with pytest.raises(RenderError) as err:
        helm_template(helm, *args)
    return str(err.value)


METADATA = ipaddress.ip_address("169.254.169.254")

#: what examples/production-values.yaml adds on purpose: metrics scrapers, on-premises CIDRs, campus Dask clients
_NP = yaml.safe_load(PRODUCTION.read_text())["networkPolicy"]
OPERATOR_PEERS = list(_NP["metricsScrapers"].values())
OPERATOR_CIDRS = {c for who in ("singleuser", "dask") for e in _NP[who]["egress"].values() for c in e["cidrs"]} | set(
    yaml.safe_load(PRODUCTION.read_text())["gateway"]["proxy"]["service"]["loadBalancerSourceRanges"]
)


def _operator_rule(rule: dict, key: str) -> bool:
    peers = rule.get(key) or []
    return bool(peers) and all(
        p in OPERATOR_PEERS
        or ("ipBlock" in p and "except" not in p["ipBlock"] and p["ipBlock"]["cidr"] in OPERATOR_CIDRS)
        for p in peers
    )


def _core(rules: list[dict], key: str) -> list[dict]:
    """The chart's own rules, without those the operator's values add (metricsScrapers, egress, gateway.proxy.service)."""
    return [r for r in rules if not _operator_rule(r, key)]


def _policies(objects) -> dict[str, dict]:
    return {component(n): n["spec"] for n in find(objects, "NetworkPolicy")}


#: where the chart's default DNS rule (networkPolicy.egressAllowRules, port 53 only) may send queries
DNS_PEERS = {
    "{'matchLabels': {'kubernetes.io/metadata.name': 'kube-system'}}",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "169.254.169.254/32",
    "169.254.20.10/32",
}


def _peer_components(peers: list[dict], objects, dns: bool = False) -> set[str]:
    if dns:  # a port-53-only rule: its peers are DNS servers
        return {"dns:" + str(p.get("namespaceSelector") or p.get("ipBlock", {}).get("cidr") or p) for p in peers}
    labels = {
        comp: {
            "app.kubernetes.io/name": "workbench",
            "app.kubernetes.io/instance": RELEASE,
            "app.kubernetes.io/component": comp,
        }
        for comp in COMPONENTS
    }
    labels["singleuser"] = singleuser_labels(RELEASE)
    # notebook jobs' pods (workbench.jobs.kube labels them from the notebook pod's labels)
    labels["notebook-job"] = {"app.kubernetes.io/instance": RELEASE, "app.kubernetes.io/component": "notebook-job"}
    out = set()
    for peer in peers:
        match = peer.get("podSelector", {}).get("matchLabels", {})
        if match.get("app.kubernetes.io/component", "").startswith("dask-"):
            assert match["gateway.dask.org/instance"] == f"{RELEASE}-gateway"
            out.add(match["app.kubernetes.io/component"])
        elif match:
            [comp] = [c for c, want in labels.items() if want.items() <= match.items()]
            out.add(comp)
        elif "namespaceSelector" in peer:
            out.add("dns:" + str(peer["namespaceSelector"]))
        else:
            out.add("ipBlock:" + peer["ipBlock"]["cidr"])
    return out


def _ports(rule: dict) -> set[int]:
    return {p["port"] for p in rule.get("ports", [])}


def _reaches(rule: dict, ip, port: int = 443) -> bool:
    """Whether an egress rule lets traffic to ``ip`` (not a pod) on ``port`` through."""
    if rule.get("ports") and port not in _ports(rule):
        return False
    if "to" not in rule or not rule["to"]:
        return True
    for peer in rule["to"]:
        block = peer.get("ipBlock")
        if (
            block
            and ip in ipaddress.ip_network(block["cidr"])
            and not any(ip in ipaddress.ip_network(e) for e in block.get("except", []))
        ):
            return True
    return False


def policies_selector(objects, comp: str) -> dict:
    return {
        "matchLabels": {
            "app.kubernetes.io/name": "workbench",
            "app.kubernetes.io/instance": RELEASE,
            "app.kubernetes.io/component": comp,
        }
    }
