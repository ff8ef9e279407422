"""The Cloud Hypervisor API contract: upstream's OpenAPI spec, and validators made from it.

`cloud-hypervisor.yaml` beside this file is upstream's `vmm/src/api/openapi/cloud-hypervisor.yaml` at
commit ae44c2971c83dd2b1bd704fa81102ec0dec4e7d4 (API 0.3.0, CH v53.0 era), unchanged; sha256 `SPEC_SHA256`
(the test suite checks it against shared/cloud-hypervisor/). Both the client's contract test and the
stand-in VMM validate against it, strictly: an object may carry only the properties its schema names
(CH's serde config structs reject unknown fields too), and integers must fit their `format`.
"""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from jsonschema import Draft7Validator

SPEC_PATH = Path(__file__).with_name("cloud-hypervisor.yaml")
SPEC_SHA256 = "a0772f45ccd007f18a431d303d19a1d31f515f254d55f500509d4d7c25515f10"
API_ROOT = "/api/v1"

_INT_RANGES = {"int8": (-(2**7), 2**7 - 1), "uint8": (0, 2**8 - 1), "int16": (-(2**15), 2**15 - 1),
               "uint16": (0, 2**16 - 1), "int32": (-(2**31), 2**31 - 1), "uint32": (0, 2**32 - 1),
               "int64": (-(2**63), 2**63 - 1)}


@cache
def _formats():
    """jsonschema is imported here, on the first validation, not with this module: the client, the host agent and
    every `hearth` command import API_ROOT from here, and jsonschema's import costs a second or more of CPU."""
    from jsonschema import FormatChecker

    formats = FormatChecker()
    for name, (low, high) in _INT_RANGES.items():
        formats.checks(name)(lambda value, low=low, high=high: not isinstance(value, int) or low <= value <= high)
    return formats


@cache
def spec() -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: 10 ms instead of 90 for every VMM start
    return yaml.load(SPEC_PATH.read_text(), Loader=loader)


@cache
def _strict_document() -> dict[str, Any]:
    document = copy.deepcopy(spec())
    for schema in document["components"]["schemas"].values():
        _forbid_extra(schema)
    return document


def _forbid_extra(schema: Any) -> None:
    if isinstance(schema, dict):
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        for value in schema.values():
            _forbid_extra(value)
    elif isinstance(schema, list):
        for value in schema:
            _forbid_extra(value)


@cache
def validator(schema_name: str) -> Draft7Validator:
    """A validator for `#/components/schemas/<schema_name>` with the spec's references resolvable."""
    document = _strict_document()
    if schema_name not in document["components"]["schemas"]:
        raise KeyError(f"the spec has no schema {schema_name!r}")
    root = {"$ref": f"#/components/schemas/{schema_name}", "components": document["components"]}
    from jsonschema import Draft7Validator

    return Draft7Validator(root, format_checker=_formats())


def errors(schema_name: str, instance: Any) -> list[str]:
    """Every way `instance` breaks the schema, as `path: message` lines (empty when valid)."""
    found = sorted(validator(schema_name).iter_errors(instance), key=lambda e: list(e.absolute_path))
    return [f"{'/'.join(map(str, e.absolute_path)) or '(body)'}: {e.message}" for e in found]


def endpoint(method: str, name: str) -> dict[str, Any]:
    """The spec's operation object for `PUT /vm.create` style calls; KeyError when it has none."""
    return spec()["paths"][f"/{name}"][method.lower()]


def request_schema(method: str, name: str) -> str | None:
    """The schema name a request body must match, or None when the endpoint takes no body."""
    body = endpoint(method, name).get("requestBody")
    if body is None:
        return None
    return body["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]


def response_schema(method: str, name: str, status: int) -> str | None:
    """The schema name a response body must match, or None when the status has no body."""
    response = endpoint(method, name)["responses"].get(status) or endpoint(method, name)["responses"].get(str(status))
    if not response or "content" not in response:
        return None
    return response["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
