#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# scripts/qemu-series export and lint on a tiny base tree: each new file
# enters in the patch patches/qemu/files names, in the form it has there
# (a later patch's hunks to it are undone from the checkout's final
# form), the exported files git-am on the bare base to the checkout's
# final content, and a file the list does not place, a list entry for a
# patch the series lacks, and the form checks' failures are refused.
# Needs git and patch only: no QEMU, no network.

set -uo pipefail
TOP=$(cd "$(dirname "$0")/../.." && pwd)

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
n=0
failed=0
ok() { n=$((n + 1)); echo "ok $n - $1"; }
bad() { n=$((n + 1)); echo "not ok $n - $1"; failed=$((failed + 1)); }

# The base: an "orig tarball" with a MAINTAINERS section, a meson.build,
# a schema, a docs index and a checkpatch that finds nothing.
b=$scratch/base/qemu-1.0
mkdir -p "$b/hw/virtio" "$b/qapi" "$b/docs/specs" "$b/scripts"
printf 'virtio-mem\nM: Someone <someone@example.org>\nF: hw/virtio/virtio-mem.c\n\nother\nF: other/\n' > "$b/MAINTAINERS"
printf "files('virtio-mem.c')\n" > "$b/hw/virtio/meson.build"
printf '/* virtio-mem */\n' > "$b/hw/virtio/virtio-mem.c"
printf '##\n# @query-x:\n# Since: 1.0\n##\n' > "$b/qapi/machine.json"
printf '.. toctree::\n\n   pci-ids\n' > "$b/docs/specs/index.rst"
printf 'exit 0;\n' > "$b/scripts/checkpatch.pl"
tar -C "$scratch/base" -cJf "$scratch/qemu_1.0.orig.tar.xz" qemu-1.0

# The final form of the project's checkout: two new files, one of which
# the second patch extends.
s=$scratch/src
mkdir -p "$s/hw/virtio" "$s/docs/specs" "$s/patches/qemu"
printf 'int a(void);\nint a(void) { return 1; }\nint b(void) { return 2; }\n' > "$s/hw/virtio/virtio-mem-x.c"
printf 'X\n=\n' > "$s/docs/specs/virtio-mem-x.rst"

# Patches made the way a developer makes them: commits in a clone.
g=$scratch/dev
cp -r "$b" "$g"
git -C "$g" init -q && git -C "$g" add -A &&
    git -C "$g" -c user.name=T -c user.email=t@example.org commit -q -m base
commit() { git -C "$g" add -A && git -C "$g" -c user.name=T -c user.email=t@example.org commit -q -m "$1" -m "Body of $1."; }
printf "files('virtio-mem.c', 'virtio-mem-x.c')\n" > "$g/hw/virtio/meson.build"
printf '##\n# @query-x:\n# Since: 1.0\n##\n# @query-y:\n# Since: 1.1\n##\n' > "$g/qapi/machine.json"
printf 'int a(void);\nint a(void) { return 1; }\n' > "$g/hw/virtio/virtio-mem-x.c"
commit "virtio-mem: add a"
printf 'int a(void);\nint a(void) { return 1; }\nint b(void) { return 2; }\n' > "$g/hw/virtio/virtio-mem-x.c"
commit "virtio-mem: add b"
printf 'virtio-mem\nM: Someone <someone@example.org>\nF: hw/virtio/virtio-mem.c\nF: hw/virtio/virtio-mem-x.c\nF: docs/specs/virtio-mem-x.rst\n\nother\nF: other/\n' > "$g/MAINTAINERS"
printf '.. toctree::\n\n   pci-ids\n   virtio-mem-x\n' > "$g/docs/specs/index.rst"
cp "$s/docs/specs/virtio-mem-x.rst" "$g/docs/specs/"
commit "docs: MAINTAINERS and the spec"
# Patch files hold hunks to upstream files and to new files of earlier
# patches; the new files themselves come from the checkout.
git -C "$g" format-patch -q -o "$s/patches/qemu" HEAD~3..HEAD
p1=$(cd "$s/patches/qemu" && ls 0001-*); p2=$(cd "$s/patches/qemu" && ls 0002-*); p3=$(cd "$s/patches/qemu" && ls 0003-*)
for p in "$p1" "$p3"; do   # drop the new files' creation from these two
    awk 'BEGIN { on = 1 }
         /^diff --git / { on = ($3 != "a/hw/virtio/virtio-mem-x.c" && $3 != "a/docs/specs/virtio-mem-x.rst") }
         /^-- $/ { on = 1 }
         on' "$s/patches/qemu/$p" > "$s/p.tmp"
    mv "$s/p.tmp" "$s/patches/qemu/$p"
done
(cd "$s/patches/qemu" && ls 0*.patch) > "$s/patches/qemu/series"
printf 'hw/virtio/virtio-mem-x.c %s\ndocs/specs/virtio-mem-x.rst %s\n' "${p1#0001-}" "${p3#0003-}" > "$s/patches/qemu/files"

qs() {
    QEMU_SERIES_SRC=$s QEMU_SERIES_OUT=$scratch/out VMM_CACHE=$scratch/cache \
        QEMU_ORIG=$scratch/qemu_1.0.orig.tar.xz "$TOP/scripts/qemu-series" "$@"
}

# 1. export: three patches and the new files where the list puts them.
if out=$(qs export 10.0 2>&1); then ok "export succeeds"; else bad "export failed: $out"; fi
e=$scratch/out
[ "$(ls "$e"/0*.patch 2>/dev/null | wc -l)" = 3 ] && ok "three patches exported" || bad "exported: $(ls "$e")"
grep -q '^+int a(void) { return 1; }$' "$e/$p1" && ! grep -q 'return 2' "$e/$p1" &&
    grep -q '^new file mode' "$e/$p1" &&
    ok "patch 1 creates virtio-mem-x.c without what patch 2 adds" || bad "patch 1: $(grep -c . "$e/$p1") lines, wrong new file"
grep -q '^+int b(void) { return 2; }$' "$e/$p2" && ! grep -q '^new file mode' "$e/$p2" &&
    ok "patch 2 extends virtio-mem-x.c" || bad "patch 2 does not extend virtio-mem-x.c"
grep -q '^+++ b/docs/specs/virtio-mem-x.rst' "$e/$p3" && ok "patch 3 adds the spec" || bad "patch 3 lacks the spec"

# 2. git am on the bare base gives the checkout's final files.
a=$scratch/am
mkdir -p "$a" && tar -xJf "$scratch/qemu_1.0.orig.tar.xz" -C "$a" --strip-components=1
git -C "$a" init -q && git -C "$a" add -A && git -C "$a" -c user.name=T -c user.email=t@example.org commit -q -m base
if git -C "$a" -c user.name=T -c user.email=t@example.org am -q "$e"/000[1-9]-*.patch; then
    cmp -s "$a/hw/virtio/virtio-mem-x.c" "$s/hw/virtio/virtio-mem-x.c" &&
        cmp -s "$a/docs/specs/virtio-mem-x.rst" "$s/docs/specs/virtio-mem-x.rst" &&
        ok "git am on the base gives the checkout's files" || bad "git am result differs from the checkout"
else
    bad "git am of the export failed"
fi

# 3. lint: since 1.1 is wrong for a 10.0 base (10.1); the rest passes.
out=$(qs lint 10.0 2>&1)
grep -q 'form: QAPI since: FAILED' <<<"$out" && grep -q 'form: MAINTAINERS: ok' <<<"$out" &&
    grep -q 'form: toctree: ok' <<<"$out" && grep -q 'lint 10.0: 4 passed, 1 failed' <<<"$out" &&
    ok "lint: a wrong QAPI since fails, MAINTAINERS and toctree pass" || { bad "lint output:"; sed 's/^/# /' <<<"$out"; }

# 4. refusals, each with a sentence that says what to fix.
printf 'int c;\n' > "$s/hw/virtio/virtio-mem-y.c"
out=$(qs export 10.0 2>&1) && bad "a new file missing from the list was accepted" ||
    { grep -q 'virtio-mem-y.c is linked into the fork but patches/qemu/files names no patch' <<<"$out" &&
      ok "a new file missing from the list is refused" || bad "message: $out"; }
rm "$s/hw/virtio/virtio-mem-y.c"
printf 'hw/virtio/virtio-mem-x.c gone.patch\n' > "$s/patches/qemu/files"
printf 'docs/specs/virtio-mem-x.rst %s\n' "${p3#0003-}" >> "$s/patches/qemu/files"
out=$(qs export 10.0 2>&1) && bad "a list entry for a missing patch was accepted" ||
    { grep -q 'puts hw/virtio/virtio-mem-x.c in gone.patch, which is not in' <<<"$out" &&
      ok "a list entry naming no patch of the series is refused" || bad "message: $out"; }

echo "1..$n"
echo "$((n - failed)) passed, $failed failed"
[ $failed = 0 ]
