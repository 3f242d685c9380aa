#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# The build stops with a message that says what to do when a patch does
# not apply, a tool is missing, or a download fails.  Runs against a
# scratch copy of the scripts and a scratch cache that reuses the real
# cache's downloads, so it needs a completed build and no network.

set -uo pipefail
TOP=$(cd "$(dirname "$0")/../.." && pwd)
. "$TOP/scripts/common.sh"
real_cache=$CACHE

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
n=0
failed=0

# expect NAME STATUS PATTERN -- command...
expect() {
    local name=$1 want_fail=$2 pattern=$3 out st
    shift 4
    n=$((n + 1))
    out=$("$@" 2>&1 >/dev/null)
    st=$?
    if [ "$want_fail" = fail ] && [ $st = 0 ]; then
        echo "not ok $n - $name: succeeded, expected a failure"; failed=$((failed + 1))
    elif ! grep -qE "$pattern" <<< "$out"; then
        echo "not ok $n - $name: message does not match /$pattern/:"
        sed 's/^/# /' <<< "$out" | tail -n 5
        failed=$((failed + 1))
    else
        echo "ok $n - $name: $(grep -E "$pattern" <<< "$out" | head -n1)"
    fi
}

# A scratch checkout: the scripts, and a QEMU series whose second patch
# does not apply.
mkdir -p "$scratch/top/patches/qemu" "$scratch/cache/download"
cp -r "$TOP/scripts" "$scratch/top/"
cat > "$scratch/top/patches/qemu/0001-good.patch" <<'EOP'
--- a/VERSION
+++ b/VERSION
@@ -1 +1,2 @@
 10.0.13
+fork
EOP
cat > "$scratch/top/patches/qemu/0002-stale.patch" <<'EOP'
--- a/VERSION
+++ b/VERSION
@@ -1 +1 @@
-9.2.0
+9.2.1
EOP
printf '0001-good.patch\n0002-stale.patch\n' > "$scratch/top/patches/qemu/series"
# Reuse the verified base tree rather than downloading it again.
for d in "$real_cache"/qemu-*-base "$real_cache"/download/*; do
    [ -e "$d" ] && ln -s "$d" "$scratch/cache/${d#"$real_cache"/}"
done

export VMM_CACHE=$scratch/cache
base_state() {
    local b
    for b in "$real_cache"/qemu-*-base; do
        stat -c '%n %Y' "$b" "$b/.unpacked" "$b/VERSION" 2>&1
        md5sum "$b/VERSION"
    done
}
before=$(base_state)

expect "broken patch names the patch and the fix" fail \
    "patch 2 \(0002-stale.patch\) does not apply .*refresh patches/qemu/0002-stale.patch" \
    -- "$scratch/top/scripts/fetch-qemu"

# A PATH with everything but dpkg-source.
mkdir -p "$scratch/nodpkg"
for f in /usr/bin/*; do
    [ "${f##*/}" = dpkg-source ] || ln -s "$f" "$scratch/nodpkg/"
done
expect "missing tool says to run install-deps" fail \
    "'dpkg-source' not found: run 'scripts/install-deps'" \
    -- env PATH="$scratch/nodpkg" "$scratch/top/scripts/fetch-qemu"

# apt-get that cannot reach the archive: lists still answer, downloads fail.
mkdir -p "$scratch/bin"
cat > "$scratch/bin/apt-get" <<'EOS'
#!/bin/sh
case " $* " in *" source "*|*" download "*) echo "E: Failed to fetch (simulated)" >&2; exit 100;; esac
exec /usr/bin/apt-get "$@"
EOS
chmod +x "$scratch/bin/apt-get"
mkdir -p "$scratch/cache2"
expect "failed kernel download says what failed and what to do" fail \
    "download of linux-image-[^ ]+ failed; check the network" \
    -- env PATH="$scratch/bin:$PATH" VMM_CACHE="$scratch/cache2" "$scratch/top/scripts/fetch-linux"

expect "failed QEMU download says what failed and what to do" fail \
    "download of qemu=[^ ]+ failed; check the network" \
    -- env PATH="$scratch/bin:$PATH" VMM_CACHE="$scratch/cache2" "$scratch/top/scripts/fetch-qemu"

expect "unknown version series is reported" fail \
    "no qemu source of the 9.9 series" \
    -- env QEMU_SERIES=9.9 "$scratch/top/scripts/fetch-qemu"

n=$((n + 1))
if [ "$(base_state)" = "$before" ]; then
    echo "ok $n - the shared pristine base tree was not modified"
else
    echo "not ok $n - the tests modified the shared base tree:"
    diff <(echo "$before") <(base_state) | sed 's/^/# /'
    failed=$((failed + 1))
fi

echo "1..$n"
[ $failed = 0 ]
