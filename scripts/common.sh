# SPDX-License-Identifier: GPL-2.0-or-later
# Shared settings for the project's scripts.  Source, do not execute.

# Base trees are pinned by version series; the newest of the series that
# the Debian archive serves is used and recorded in the cache.
QEMU_SERIES=${QEMU_SERIES:-10.0}
LINUX_SERIES=${LINUX_SERIES:-6.12}
LINUX_FLAVOUR=${LINUX_FLAVOUR:-cloud-amd64}

CACHE=${VMM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/virtio-mem-vmemmap}
TOP=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Newest source version of package $1 whose upstream version starts with
# series $2 (epoch stripped).
newest_src_version() {
    apt-cache showsrc "$1" 2>/dev/null | sed -n 's/^Version: //p' |
        while read -r v; do
            case "${v#*:}" in "$2".*) echo "$v";; esac
        done | sort -V -r | head -n1 |
        { read -r best || true; echo "${best:-}"; }
}

need_cmd() {
    command -v "$1" >/dev/null ||
        die "'$1' not found: run 'scripts/install-deps' first"
}
