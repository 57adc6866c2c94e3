"""Reading untrusted configuration objects (YAML documents, Kubernetes JSON) field by field.

Every accessor takes the path of the value it reads so an error can name the exact field
(`spec.rules[0].from[0].source.principals[1]`); a file source maps that path to a line.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Literal, NoReturn

FieldPath = tuple[str | int, ...]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def format_path(path: FieldPath) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out or "(document)"


class FieldError(ValueError):
    """A configuration value is invalid; `path` names the field, `location` the file:line."""

    def __init__(self, path: FieldPath, message: str, location: str | None = None) -> None:
        self.path = path
        self.message = message
        self.location = location
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{format_path(self.path)}: {self.message}"
        return f"{self.location}: {text}" if self.location else text

    def at(self, location: str) -> FieldError:
        return FieldError(self.path, self.message, location)


def fail(path: FieldPath, message: str) -> NoReturn:
    raise FieldError(path, message)


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    return {dict: "mapping", list: "list", str: "string", bool: "boolean", int: "integer",
            float: "number"}.get(type(value), type(value).__name__)


def mapping(value: object, path: FieldPath) -> Mapping[str, object]:
    if not isinstance(value, Mapping):
        fail(path, f"want a mapping, got {_type_name(value)}")
    for key in value:
        if not isinstance(key, str):
            fail((*path, str(key)), f"keys must be strings, got {_type_name(key)}")
    return value


def check_keys(obj: Mapping[str, object], path: FieldPath, known: Collection[str]) -> None:
    for key in obj:
        if key not in known:
            fail((*path, key), f"unknown field (known fields: {', '.join(sorted(known))})")


def optional_mapping(obj: Mapping[str, object], key: str, path: FieldPath) -> Mapping[str, object]:
    value = obj.get(key)
    return {} if value is None else mapping(value, (*path, key))


def optional_mapping_any_keys(obj: Mapping[str, object], key: str,
                              path: FieldPath) -> Mapping[object, object]:
    """A mapping whose keys may be numbers (YAML `8080: ...`), such as port maps."""
    value = obj.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        fail((*path, key), f"want a mapping, got {_type_name(value)}")
    return value


def items(obj: Mapping[str, object], key: str, path: FieldPath) -> list[object]:
    """A list field; absent or null is empty."""
    value = obj.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        fail((*path, key), f"want a list, got {_type_name(value)}")
    return value


def string(obj: Mapping[str, object], key: str, path: FieldPath, *, default: str | None = None,
           nonempty: bool = True) -> str:
    value = obj.get(key)
    if value is None:
        if default is None:
            fail((*path, key), "required field is missing")
        return default
    if not isinstance(value, str):
        fail((*path, key), f"want a string, got {_type_name(value)}")
    if nonempty and not value:
        fail((*path, key), "must not be empty")
    return value


def strings(obj: Mapping[str, object], key: str, path: FieldPath) -> list[str]:
    out = []
    for i, value in enumerate(items(obj, key, path)):
        if not isinstance(value, str):
            fail((*path, key, i), f"want a string, got {_type_name(value)}")
        if not value:
            fail((*path, key, i), "must not be empty")
        out.append(value)
    return out


def boolean(obj: Mapping[str, object], key: str, path: FieldPath, default: bool) -> bool:
    value = obj.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        fail((*path, key), f"want true or false, got {_type_name(value)}")
    return value


def string_map(obj: Mapping[str, object], key: str, path: FieldPath) -> dict[str, str]:
    """A map of strings such as labels; Kubernetes requires string values (quote numbers)."""
    out = {}
    for k, v in optional_mapping(obj, key, path).items():
        if not isinstance(v, str):
            fail((*path, key, k), f"want a string value (quote it), got {_type_name(v)}")
        out[k] = v
    return out


def port(value: object, path: FieldPath, *, allow_zero: bool = False) -> int:
    """A TCP port given as an integer or a decimal string (Istio writes ports as strings)."""
    if isinstance(value, bool):
        fail(path, "want a port number, got a boolean")
    if isinstance(value, str) and value.isascii() and value.isdigit():
        number = int(value)
    elif isinstance(value, int):
        number = value
    else:
        fail(path, f"want a port number, got {value!r}")
    if not (0 if allow_zero else 1) <= number <= 65535:
        fail(path, f"port {number} is out of range 1-65535")
    return number


def ip_address(value: object, path: FieldPath) -> IPAddress:
    if not isinstance(value, str):
        fail(path, f"want an IP address string, got {_type_name(value)}")
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        fail(path, f"{value!r} is not an IPv4 or IPv6 address")


def ip_network(value: object, path: FieldPath) -> IPNetwork:
    """A single IP or a CIDR; host bits are allowed (as Istio accepts them) and cleared."""
    if not isinstance(value, str):
        fail(path, f"want an IP address or CIDR string, got {_type_name(value)}")
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        fail(path, f"{value!r} is not an IP address or CIDR (e.g. 10.0.0.0/8)")


# Object names, as the Kubernetes API server validates them (apimachinery's validation package):
# namespaces and label-named objects are DNS-1123 labels, most objects (pods, service accounts,
# custom resources such as Istio's) DNS-1123 subdomains, Services DNS-1035 labels.
_LABEL = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_LABEL = re.compile(_LABEL)
_DNS1123_SUBDOMAIN = re.compile(rf"{_LABEL}(\.{_LABEL})*")
_DNS1035_LABEL = re.compile("[a-z]([-a-z0-9]*[a-z0-9])?")
NameRule = Literal["label", "subdomain", "dns1035"]
_NAME_RULES: dict[NameRule, tuple[re.Pattern[str], int, str]] = {
    "label": (_DNS1123_LABEL, 63, "a DNS-1123 label: lowercase letters, digits and '-', "
              "starting and ending with a letter or digit"),
    "subdomain": (_DNS1123_SUBDOMAIN, 253, "a DNS-1123 subdomain: lowercase letters, digits, "
                  "'-' and '.', each '.'-separated part starting and ending with a letter or "
                  "digit"),
    "dns1035": (_DNS1035_LABEL, 63, "a DNS-1035 label: lowercase letters, digits and '-', "
                "starting with a letter and ending with a letter or digit"),
}


def check_name(value: str, path: FieldPath, rule: NameRule) -> str:
    """`value` if it is a valid Kubernetes name under `rule`, else a FieldError saying why."""
    pattern, limit, what = _NAME_RULES[rule]
    if len(value) > limit:
        fail(path, f"{value[:40]!r}... ({len(value)} characters) is not a valid Kubernetes name: "
             f"must be no more than {limit} characters ({what})")
    if not pattern.fullmatch(value):
        fail(path, f"{value!r} is not a valid Kubernetes name: want {what} (e.g. 'my-name')")
    return value


def name(obj: Mapping[str, object], key: str, path: FieldPath, rule: NameRule, *,
         default: str | None = None) -> str:
    """A required (or defaulted) string field holding a Kubernetes name."""
    return check_name(string(obj, key, path, default=default), (*path, key), rule)


# Keys Kubernetes puts in ObjectMeta; accepted (mostly ignored) so objects read back from the API
# server or `kubectl get -o yaml` load unchanged.
OBJECT_META_KEYS = frozenset({
    "name", "namespace", "labels", "annotations", "uid", "resourceVersion", "generation",
    "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "managedFields",
    "ownerReferences", "finalizers", "generateName", "selfLink",
})


@dataclass(frozen=True)
class ObjectHead:
    """What every Istio security object shares: the document, its metadata and identity."""

    doc: Mapping[str, object]
    name: str
    namespace: str
    annotations: dict[str, str]
    created: str  # creationTimestamp (RFC 3339 sorts as text); "" when absent


def object_head(obj: object, path: FieldPath, kind: str,
                api_versions: Collection[str]) -> ObjectHead:
    """Check apiVersion, kind and metadata of a Kubernetes-shaped object with a spec."""
    doc = mapping(obj, path)
    check_keys(doc, path, ("apiVersion", "kind", "metadata", "spec", "status"))
    api = string(doc, "apiVersion", path)
    if api not in api_versions:
        fail((*path, "apiVersion"), f"{api!r}: want one of {', '.join(api_versions)}")
    if string(doc, "kind", path) != kind:
        fail((*path, "kind"), f"want {kind}")
    mp = (*path, "metadata")
    meta = mapping(doc.get("metadata"), mp)
    check_keys(meta, mp, OBJECT_META_KEYS)
    # Custom resources (Istio's kinds) get the API server's generic checks: a subdomain name in
    # a namespace that is a label.
    name_ = name(meta, "name", mp, "subdomain")
    namespace = name(meta, "namespace", mp, "label", default="default")
    string_map(meta, "labels", mp)  # unused, but Kubernetes would reject non-string values
    return ObjectHead(doc, name_, namespace, annotations=string_map(meta, "annotations", mp),
                      created=str(meta.get("creationTimestamp") or ""))
