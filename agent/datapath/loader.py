"""The short-lived loader: compiles the bpf/ sources with BCC, loads every program and pins it
under <pin_dir>/progs (the maps pin themselves, BPF_TABLE_PINNED), then exits.

The long-running agent never holds BCC or LLVM (tens of MiB resident, issue #14): it runs this
module as a subprocess (`python -m agent.datapath.loader OPTIONS_JSON`) and then works on the
pinned objects through the bpf syscall layer. Tests may load in process instead, where the
compiled module is cached per BuildOptions.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

from agent.datapath import bpfsys
from agent.datapath.bccloader import DatapathBuildError, compile_module, forget
from agent.datapath.options import BuildOptions
from agent.datapath.programs import ALL_PROGRAMS, PROGS_DIR

TIMEOUT = 300.0  # compiling takes seconds; a hung loader must not hang the agent's start


def options_json(options: BuildOptions) -> str:
    raw = dataclasses.asdict(options)
    raw["pin_dir"] = str(options.pin_dir)
    return json.dumps(raw)


def options_from_json(text: str) -> BuildOptions:
    raw = json.loads(text)
    raw["pin_dir"] = Path(raw["pin_dir"])
    raw["sources"] = tuple(raw["sources"])
    raw["extra_cflags"] = tuple(raw["extra_cflags"])
    return BuildOptions(**raw)


def pin_programs(options: BuildOptions, *, cached: bool = True) -> list[str]:
    """Compile (or reuse this process's module), load, and pin each program; a pin of an older
    build is replaced by rename, so a reader always finds one complete program there."""
    module = compile_module(options, cached=cached)
    progs = options.pin_dir / PROGS_DIR
    progs.mkdir(parents=True, exist_ok=True)
    done = []
    try:
        for prog in ALL_PROGRAMS:
            fd = module.load(prog.name, prog.prog_type, int(prog.attach_type))
            staged = progs / f"staged-{prog.name}"  # bpffs names may not contain dots
            staged.unlink(missing_ok=True)
            bpfsys.obj_pin(fd, staged)
            os.replace(staged, progs / prog.name)
            done.append(f"pinned {prog.name}")
    finally:
        if not cached:
            module.close()
    return done


def run_loader(options: BuildOptions) -> list[str]:
    """Run the loader in a child process; raises DatapathBuildError with its message."""
    proc = subprocess.run([sys.executable, "-m", "agent.datapath.loader", options_json(options)],
                          capture_output=True, text=True, timeout=TIMEOUT, check=False)
    if proc.returncode != 0:
        raise DatapathBuildError(proc.stderr.strip()[-4000:] or
                                 f"the eBPF loader exited with status {proc.returncode}")
    return [line for line in proc.stdout.splitlines() if line]


def release(options: BuildOptions) -> None:
    """Drop this process's cached module of `options` (its pins were removed)."""
    forget(options)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m agent.datapath.loader OPTIONS_JSON", file=sys.stderr)
        return 2
    try:
        for line in pin_programs(options_from_json(argv[0]), cached=False):
            print(line)
    except DatapathBuildError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
