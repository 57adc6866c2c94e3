"""nodemesh ztunnel: the node-level HBONE (HTTP/2 CONNECT over mutual TLS 1.3) tunnel.

Modules, from the wire up:
- connect: CONNECT request headers and server-side validation (pure)
- hbone: sans-IO HTTP/2 CONNECT core on h2 (flow control, half-close, resets, GOAWAY)
- tls: CertificateSource protocol, SSL contexts from memory, SPIFFE peer checks
- relay: the plain-TCP side of a relay (asyncio Protocol with back-pressure)
- session: one HBONE connection as an asyncio Protocol around the core
- pool: shared HBONE connections keyed by (src identity, dst identity, dst IP, src IP)
- podnet: sockets in pod netns, marks, source-IP preservation (prepare_pod_netns)
- events: per-connection telemetry events
- tunnel: Tunnel (add_pod / remove_pod / drain), the per-pod 15001/15006/15008 listeners

The per-hop modules are compiled with mypyc (the list is COMPILED in setup.py); importing the
package refuses a compiled module older than its source (check_fresh).
"""

from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

_HERE = Path(__file__).parent


def extensions(directory: Path) -> dict[str, Path]:
    """The compiled extension next to each module source in `directory`, by module name (mypyc's
    shared runtime library has no source of its own and is left out)."""
    found: dict[str, Path] = {}
    for name in sorted(p.name for p in directory.iterdir()):
        for suffix in EXTENSION_SUFFIXES:
            stem = name.removesuffix(suffix)
            if stem != name:  # the most specific suffix comes first
                if (directory / f"{stem}.py").exists():
                    found[stem] = directory / name
                break
    return found


def check_fresh(directory: Path) -> dict[str, Path]:
    """Refuse a compiled module older than its source: Python imports the extension first, so
    after an edit it would silently run the old code. A wheel install (nodemesh's dist-info
    beside the package) is not checked: both files come from one build, and pip may write the
    .py a moment after its .so. Returns the extensions (`extensions`)."""
    found = extensions(directory)
    if not found or any(directory.parent.glob("nodemesh-*.dist-info")):
        return found
    for stem, ext in found.items():
        source = directory / f"{stem}.py"
        if ext.stat().st_mtime_ns < source.stat().st_mtime_ns:
            raise ImportError(
                f"{ext} is older than {source}: the compiled module would run the old code. "
                f"Rebuild with scripts/setup.sh, or remove {ext} to run the source interpreted.")
    return found


def compiled_modules() -> list[str]:
    """The ztunnel modules that run compiled (mypyc) in this process: as found when the package
    was imported, which is what its imports load."""
    return list(_LOADED)


def data_path() -> str:
    """One phrase for status output and benchmark headers."""
    return "compiled (mypyc)" if compiled_modules() else "pure Python"


_LOADED = check_fresh(_HERE)  # listed once, here
