"""Every change this project makes to h2/hyperframe internals, in one place, applied once at
import and only to the major versions it was written against.

An unknown major version fails loudly at import: a patch of private attributes that silently
stops matching would either do nothing (the cost comes back unnoticed) or break framing.
"""

from __future__ import annotations

import h2
import hyperframe
from hyperframe.frame import DataFrame

# Major versions the patches below were checked against (h2 4.x, hyperframe 6.x).
SUPPORTED = {"h2": (4,), "hyperframe": (6,)}


class UnsupportedVersionError(ImportError):
    """h2 or hyperframe is a major version these patches were never checked against."""


def _major(version: str) -> int:
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() else -1


def check_versions(versions: dict[str, str] | None = None) -> None:
    """Raise UnsupportedVersionError unless every library is a supported major version."""
    found = versions if versions is not None else {
        "h2": h2.__version__, "hyperframe": hyperframe.__version__}
    for name, version in found.items():
        if _major(version) not in SUPPORTED[name]:
            raise UnsupportedVersionError(
                f"{name} {version} is not a supported major version "
                f"({', '.join(map(str, SUPPORTED[name]))}.x): ztunnel/h2patch.py patches its "
                "internals; check the patches against it and extend SUPPORTED")


# h2 formats every received frame for a trace log line even when nothing logs it, and the DATA
# frame's repr hex-encodes the whole body (up to max_frame, 1 MiB here) before truncating it to
# 10 bytes: measured at ~22% of the tunnel's receive loop. Describe DATA frames by size instead.
def _data_frame_body_repr(frame: DataFrame) -> str:
    return f"<{len(frame.data)} bytes>"


def apply() -> None:
    check_versions()
    if not hasattr(DataFrame, "_body_repr"):
        raise UnsupportedVersionError(
            f"hyperframe {hyperframe.__version__}: DataFrame._body_repr is gone; "
            "ztunnel/h2patch.py needs updating")
    DataFrame._body_repr = _data_frame_body_repr  # type: ignore[method-assign,assignment]


apply()
