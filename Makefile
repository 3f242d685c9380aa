# SPDX-License-Identifier: GPL-2.0-or-later
# Convenience targets; the scripts under scripts/ are the interface.
-include config.mk

.PHONY: all qemu guest tools check check-qemu check-guest demo bench checkpatch series-check deb clean dkms-deb

all:
	./scripts/build
qemu:
	./scripts/build-qemu
guest:
	./scripts/build-guest --all
tools:
	./scripts/build-tools
check:
	./scripts/check
check-qemu:
	CHECK_ONLY=qemu ./scripts/check
check-guest:
	CHECK_ONLY=guest ./scripts/check
check-asan:
	./scripts/check-asan
# FUZZ_SECONDS (per harness, default 300) and FUZZ_JOBS bound the run.
fuzz:
	./scripts/fuzz
bench:
	./scripts/bench
demo:
	./scripts/demo
checkpatch:
	./scripts/checkpatch
# The posted QEMU series: every step built on Debian's orig tarball, its
# tests, the manuals with Sphinx -W (scripts/check runs it too; 29 min
# with an empty compiler cache, 12 min after a reshape, 2.5 min unchanged).
series-check:
	./scripts/qemu-series check 10.0
# The host package, build/deb/qemu-system-x86-vmemmap_*.deb.
deb:
	./scripts/build-deb
# build/deb/virtio-mem-vmemmap-dkms_<version>_all.deb (lintian-checked).
dkms-deb:
	./scripts/build-dkms-deb
clean:
	rm -rf build config.mk
