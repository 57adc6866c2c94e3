#!/bin/sh
# nodemesh-entrypoint: give BCC kernel headers for the running kernel, then exec the command.
#
# BCC compiles against /lib/modules/$(uname -r)/{build,source}. In order of preference:
#   1. headers already there (a custom image, or a host /lib/modules mounted in place);
#   2. the host's headers, mounted read-only at /host/lib/modules and /host/usr/src: the host's
#      links point into the host's /usr/src, so they are re-made here pointing into /host;
#   3. the kernel's built-in headers (/sys/kernel/kheaders.tar.xz, CONFIG_IKHEADERS), which
#      BCC extracts by itself when no headers are linked;
#   4. the Debian headers baked into the image: close enough for the networking programs
#      (their UAPI structs are stable), as on the project's own CI machines.
# Nothing is downloaded at start: a node without network access to Debian's mirrors must still
# start its agent. The NM_* variables exist for tests of this script.
set -eu

kernel=${NM_KERNEL:-$(uname -r)}
modules=${NM_MODULES:-/lib/modules}/$kernel
host=${NM_HOST:-/host}
kheaders=${NM_KHEADERS:-/sys/kernel/kheaders.tar.xz}
bundled=${NM_BUNDLED:-/usr/src}

log() { echo "nodemesh-entrypoint: $*" >&2; }

# Where a path of the host's file system is visible in this container.
on_host() {
    case $1 in
        /*) echo "$host$1" ;;
        *) echo "$host/lib/modules/$kernel/$1" ;;  # relative to the host's modules dir
    esac
}

# The host's <name> link (build or source), resolved to a directory visible here, or nothing.
host_dir() {
    entry=$host/lib/modules/$kernel/$1
    if [ -L "$entry" ]; then
        target=$(on_host "$(readlink "$entry")")
    elif [ -d "$entry" ]; then
        target=$entry
    else
        return 0
    fi
    if [ -d "$target/include" ] || [ -d "$target/arch" ]; then echo "$target"; fi
}

link_headers() {  # build_dir source_dir
    mkdir -p "$modules"
    ln -sfn "$1" "$modules/build"
    ln -sfn "$2" "$modules/source"
}

if [ -d "$modules/build/include" ]; then
    log "kernel $kernel: using headers in $modules/build"
elif build=$(host_dir build) && [ -n "$build" ]; then
    source=$(host_dir source)
    link_headers "$build" "${source:-$build}"
    log "kernel $kernel: using the host's headers in $build"
elif [ -e "$kheaders" ]; then
    log "kernel $kernel: no headers on the host; BCC will use the kernel's own ($kheaders)"
else
    arch_dir=$(ls -d "$bundled"/linux-headers-*-amd64 "$bundled"/linux-headers-*-arm64 \
        2>/dev/null | sort -V | tail -n1 || true)
    common_dir=$(ls -d "$bundled"/linux-headers-*-common 2>/dev/null | sort -V | tail -n1 || true)
    if [ -n "$arch_dir" ] && [ -n "$common_dir" ]; then
        link_headers "$arch_dir" "$common_dir"
        log "kernel $kernel: no headers on the host; using the image's $(basename "$arch_dir")" \
            "(install linux-headers-$kernel on the node for exact ones)"
    else
        log "kernel $kernel: no kernel headers found; compiling the eBPF programs will fail." \
            "Install linux-headers-$kernel on the node (mounted from /lib/modules and /usr/src)"
    fi
fi

exec "$@"
