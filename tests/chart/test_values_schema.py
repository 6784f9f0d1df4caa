"""values.schema.json: generated from the policy model, never hand-synced."""

from __future__ import annotations

import importlib.util
import json

import jsonschema
import pytest
import yaml

from workbench.policy import PolicyError, parse_policy

from .conftest import CENTRE, CHART, ROOT

SCHEMA = CHART / "values.schema.json"
DEMO = ROOT / "hub_config" / "demo.yaml"
TRY_OUT = CHART / "files" / "try-out-platform.yaml"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_values_schema", ROOT / "scripts" / "gen-values-schema.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads(SCHEMA.read_text())


@pytest.fixture(scope="module")
def platform_validator(schema):
    """A validator of the `platform` value alone (its $refs point at the root's $defs)."""
    platform = {**schema["properties"]["platform"], "$defs": schema["$defs"]}
    return jsonschema.Draft202012Validator(platform)


def test_the_committed_schema_is_generated_from_the_policy_model():
    """Fails when workbench.policy.Policy (or values.schema.yaml) changed and the schema was not regenerated.

    Fix: .venv/bin/python scripts/gen-values-schema.py
    """
    committed = SCHEMA.read_text()
    generated = _generator().render()
    assert committed == generated, "charts/workbench/values.schema.json is stale: run scripts/gen-values-schema.py"


def test_the_schema_is_valid_json_schema(schema):
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["properties"]["platform"]["additionalProperties"] is False


def _tryout() -> dict:
    text = TRY_OUT.read_text().replace(
        '{{ include "workbench.ownImage" (dict "root" . "name" "base") | quote }}', '"registry.example.edu/base:1"'
    )
    assert "{{" not in text
    return yaml.safe_load(text)


@pytest.mark.parametrize("source", ["demo", "centre", "try-out"])
def test_the_policies_we_ship_pass_the_schema(platform_validator, source):
    data = {
        "demo": lambda: yaml.safe_load(DEMO.read_text()),
        "centre": lambda: yaml.safe_load(CENTRE.read_text()),
        "try-out": _tryout,
    }[source]()
    errors = list(platform_validator.iter_errors(data))
    assert not errors, [e.message for e in errors]
    parse_policy(data, source=source)  # and the policy model agrees


BAD = {
    "unknown top-level key": ({"colour": "red"}, "Additional properties"),
    "unknown group key": ({"groups": {"lab": {"kind": "research", "colour": "red"}}}, "Additional properties"),
    "bad group kind": ({"groups": {"lab": {"kind": "club"}}}, "is not one of"),
    "upper-case profile name": ({"profiles": {"Big": {}}}, "does not match"),
    "memory with a bad unit": ({"profiles": {"big": {"memory": "8GB"}}}, "is not valid under any"),
    "zero cores": ({"profiles": {"big": {"cpu": 0}}}, "is not valid under any"),
    "bad duration": ({"culling": {"timeout": "an hour"}}, "is not valid under any"),
    "gpu count too high": ({"profiles": {"big": {"gpu": {"type": "h100", "count": 64}}}}, "is not valid under any"),
}


#: a valid policy the bad parts are added to, so that the policy's own error is about them
BASE = {"auth": {"type": "demo", "demo_users": {"ada": {}}}}


@pytest.mark.parametrize("case", list(BAD))
def test_the_schema_rejects_what_the_policy_rejects(platform_validator, case):
    bad, message = BAD[case]
    data = {**BASE, **bad}
    errors = [e.message for e in platform_validator.iter_errors(data)]
    assert errors and any(message in e for e in errors), errors
    parse_policy(BASE)
    with pytest.raises(PolicyError):
        parse_policy(data)


GOOD = {
    "quantities and durations as the YAML writes them": {
        "culling": {"timeout": "90m", "every": 300},
        "profiles": {"p": {"cpu": "500m", "memory": "1.5Gi", "memory_limit": 2147483648}},
    },
    "cores as numbers": {"profiles": {"p": {"cpu": 0.5}}},
}


@pytest.mark.parametrize("case", list(GOOD))
def test_the_schema_accepts_what_the_policy_accepts(platform_validator, case):
    assert not [e.message for e in platform_validator.iter_errors(GOOD[case])]
