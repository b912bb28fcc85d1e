"""Writes base/prometheusrule.yaml, the Prometheus Operator's form of deploy/prometheus/alerts.yml.

Kustomize cannot turn a rules file into a PrometheusRule, so the resource is generated and
committed: run `python deploy/kubernetes/prometheusrule.py` after editing the alert rules
(tests/deploy fails while the two disagree)."""

from __future__ import annotations

from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
RULES = HERE.parent / "prometheus" / "alerts.yml"
OUTPUT = HERE / "base" / "prometheusrule.yaml"
HEADER = (
    "# Generated from deploy/prometheus/alerts.yml by deploy/kubernetes/prometheusrule.py:\n"
    "# edit the rules there and rerun it. Needs the monitoring.coreos.com CRDs.\n"
)


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (PromQL) as `|` blocks, as in alerts.yml."""


def _string(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _string)


def render() -> str:
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "sightline-api",
            "labels": {"app.kubernetes.io/name": "sightline-api"},
        },
        "spec": {"groups": groups},
    }
    return HEADER + yaml.dump(rule, Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True)


if __name__ == "__main__":
    OUTPUT.write_text(render(), encoding="utf-8")
    print(f"wrote {OUTPUT}")
