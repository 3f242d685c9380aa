#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# The documented libvirt domain validates against the libvirt schema of
# this machine (virt-xml-validate from libvirt-clients), turns ACPI on,
# and its override names a property the fork's virtio-mem-pci really has.

set -uo pipefail
TOP=$(cd "$(dirname "$0")/../.." && pwd)
xml=$TOP/docs/system/devices/virtio-mem-vmemmap-domain.xml
n=0
failed=0

n=$((n + 1))
if out=$(virt-xml-validate "$xml" domain 2>&1); then
    echo "ok $n - $(basename "$xml") is a valid libvirt domain"
else
    echo "not ok $n - $(basename "$xml") does not validate:"; sed 's/^/# /' <<< "$out"
    failed=$((failed + 1))
fi

# Without <acpi/> libvirt starts QEMU with acpi=off: the guest sees one
# CPU and no NUMA node (tests/guest/test_libvirt.py boots the domain).
n=$((n + 1))
if [ "$(xmllint --xpath 'count(/domain/features/acpi)' "$xml" 2>&1)" = 1 ]; then
    echo "ok $n - $(basename "$xml") turns ACPI on"
else
    echo "not ok $n - $(basename "$xml") has no <features><acpi/>"
    failed=$((failed + 1))
fi

props=$("$TOP/build/qemu-system-x86_64" -device virtio-mem-pci,help 2>&1)
for p in $(sed -n "s/.*<qemu:property name='\([^']*\)'.*/\1/p" "$xml"); do
    n=$((n + 1))
    if grep -q "^ *$p=" <<< "$props"; then
        echo "ok $n - virtio-mem-pci has property $p"
    else
        echo "not ok $n - virtio-mem-pci has no property $p"
        failed=$((failed + 1))
    fi
done

echo "1..$n"
[ $failed = 0 ]
