# moat — the two commands a user needs are `make demo` and `make test`;
# both install and build whatever they need on a fresh Debian bookworm.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
TARGET_DIR := $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)
KVM_RUN := tests/harness/kvm-run
TEST_INITRAMFS := $(TARGET_DIR)/moat-guest/test-initramfs.cpio
# Debian packages the build and the tests use. The kernel and harness
# scripts install their own too, so each also works on its own.
DEB_PACKAGES := qemu-system-x86 busybox-static cpio kmod xz-utils bc flex bison \
	libelf-dev libssl-dev linux-source-6.12 make gcc util-linux iproute2 procps \
	libseccomp-dev zlib1g-dev pkg-config runc containerd bsdutils protobuf-compiler \
	containernetworking-plugins iptables

AGENT_INITRAMFS := $(TARGET_DIR)/moat-guest/agent-initramfs.cpio.gz
# The same plus a busybox root filesystem at /busybox, for the agent's
# container tests in the harness.
AGENT_TEST_INITRAMFS := $(TARGET_DIR)/moat-guest/agent-test-initramfs.cpio.gz
AGENT_BIN := $(TARGET_DIR)/x86_64-unknown-linux-gnu/guest/moat-agent

.PHONY: demo install test deps kernel initramfs guest build build-release lint unit-test \
	harness-test fuzz-smoke test-tools kvm-test virtiofsd soak bench-boot bench-devices bench-fs bench-agent boot-rate \
	net-crash-rate bench-start bench-net

## demo: build everything, boot a pod microVM and run a container in it
## through containerd: `ctr run --runtime io.containerd.moat.v2` of a
## locally built image, in the KVM harness.
demo: deps kernel build-release guest virtiofsd
	@echo "== moat demo: containerd runs a container in its own moat microVM =="
	$(KVM_RUN) -- tests/shim/demo $(TARGET_DIR)/release/moat-vmm \
		"$$(kernel-config/build-kernel.sh | tail -n1)" $(AGENT_INITRAMFS) \
		"$$(tests/harness/install-virtiofsd | tail -n1)" $(TARGET_DIR)/release

## install: moat-vmm, the shim, virtiofsd and the guest into /usr/local,
## /etc/moat/config.toml, and moat's runtime into containerd's config
## (deploy/install.sh; PREFIX and DESTDIR as usual).
install: deps kernel build-release guest virtiofsd
	deploy/install.sh $(TARGET_DIR)/release/moat-vmm $(TARGET_DIR)/release/containerd-shim-moat-v2 \
		"$$(kernel-config/build-kernel.sh | tail -n1)" $(AGENT_INITRAMFS) \
		"$$(tests/harness/install-virtiofsd | tail -n1)"

## bench-net: pod networking through CNI's bridge, a moat pod against a
## runc pod in one run: TCP throughput each way and connect+GET latency
## (median, p99) with moat/runc ratios (tests/shim/bench-net;
## BENCH_NET_ARGS passes e.g. --bench-mib 128 --bench-rounds 5).
bench-net: deps kernel build-release guest virtiofsd test-tools
	tests/shim/write-config $(TARGET_DIR)/moat-bench.toml $(TARGET_DIR)/release/moat-vmm \
		"$$(kernel-config/build-kernel.sh | tail -n1)" $(AGENT_INITRAMFS) \
		"$$(tests/harness/install-virtiofsd | tail -n1)" >/dev/null
	$(KVM_RUN) -- tests/shim/bench-net /tmp/moat-bench-net $(TARGET_DIR)/release \
		$(TARGET_DIR)/moat-bench.toml $(TARGET_DIR)/release/cri-check $(BENCH_NET_ARGS)

## soak: the CRI suite's pod cycle case with 200 sequential networked
## pods, each a container and an exec, each checked for leftovers (7 to
## 17 s a cycle in the harness: 25 to 60 minutes; `make test` runs 20).
soak: deps kernel build-release guest virtiofsd test-tools
	tests/shim/write-config $(TARGET_DIR)/moat-soak.toml $(TARGET_DIR)/release/moat-vmm \
		"$$(kernel-config/build-kernel.sh | tail -n1)" $(AGENT_INITRAMFS) \
		"$$(tests/harness/install-virtiofsd | tail -n1)" >/dev/null
	$(KVM_RUN) --timeout 5400 -- tests/shim/cri-suite /tmp/moat-soak $(TARGET_DIR)/release \
		$(TARGET_DIR)/moat-soak.toml $(TARGET_DIR)/release/cri-check --cycles $(or $(CYCLES),200) \
		pod_cycles_leave_nothing

## bench-start: containers and CRI pods started through containerd, moat
## against runc (medians and ratios, RUNS=N, default 5), moat's start in
## phases, and an idle pod's memory (tests/shim/bench-start).
bench-start: deps kernel build-release guest virtiofsd test-tools
	tests/shim/write-config $(TARGET_DIR)/moat-bench.toml $(TARGET_DIR)/release/moat-vmm \
		"$$(kernel-config/build-kernel.sh | tail -n1)" $(AGENT_INITRAMFS) \
		"$$(tests/harness/install-virtiofsd | tail -n1)" >/dev/null
	$(KVM_RUN) -- tests/shim/bench-start /tmp/moat-bench-start $(TARGET_DIR)/release \
		$(TARGET_DIR)/moat-bench.toml $(TARGET_DIR)/release/cri-check $(or $(RUNS),5)

## test: lint, unit tests, every fuzz target for 30 s, the harness
## self-test and the KVM tests.
test: deps kernel lint unit-test fuzz-smoke harness-test kvm-test

deps:
	@missing=$$(for p in $(DEB_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q --no-install-recommends $$missing \
		|| { apt-get update -q && apt-get install -y -q --no-install-recommends $$missing; }; \
	fi

kernel:
	kernel-config/build-kernel.sh

initramfs:
	tests/guest/build-initramfs.sh $(TEST_INITRAMFS)

## guest: the pod VM's guest, the kernel and an initramfs holding only the
## static moat-agent as /init.
guest: deps kernel
	LIBSECCOMP_LINK_TYPE=static LIBSECCOMP_LIB_PATH=/usr/lib/x86_64-linux-gnu \
	RUSTFLAGS="-C target-feature=+crt-static" cargo build -p moat-agent --bin moat-agent \
		--profile guest --target x86_64-unknown-linux-gnu
	guest-agent/build-initramfs.sh $(AGENT_INITRAMFS) $(AGENT_BIN)
	guest-agent/build-initramfs.sh $(AGENT_TEST_INITRAMFS) $(AGENT_BIN) --with-busybox
	@echo "kernel: $$(kernel-config/build-kernel.sh 2>/dev/null | tail -n1)"

build:
	cargo build --workspace --all-targets

build-release:
	cargo build --workspace --release --bins

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

## virtiofsd: the pinned virtio-fs daemon (crates.io), built once with
## `cargo install --locked` into /var/cache/moat/virtiofsd/, outside the clone.
virtiofsd:
	tests/harness/install-virtiofsd

# Host tests: everything but the KVM boots. One cargo invocation: per
# package (`-p`), cargo resolves the shared dependencies' features anew and
# builds them again (about 2.5 minutes of CI's time).
unit-test: virtiofsd
	cargo test --workspace --lib --bins --test bad_config --test host --test network

## harness-test: the harness's self-test, 10 trivial runs (the script's
## default is 20; `make test` takes the shorter one to fit CI's time).
harness-test:
	tests/harness/selftest -n 10

## fuzz-smoke: every fuzz target for FUZZ_SECONDS (default 30) each on
## nightly (fuzz/smoke; longer runs: fuzz/README.md).
fuzz-smoke:
	fuzz/smoke $(or $(FUZZ_SECONDS),30)

# Helper programs of the tests: host-tool runs beside the VM, guest-tool
# (static) inside the test initramfs. Both are optimised: in the nested
# harness a debug build hashing at TCG speed, not the device, limits the
# transfer rate (1.5 MiB/s against 25 MiB/s).
test-tools:
	cargo build --release -p moat-tests -p containerd-shim-moat-v2 -p moat-cri-tests --bins
	RUSTFLAGS="-C target-feature=+crt-static" cargo build -p moat-tests --bin guest-tool \
		--bin hostile-guest --release --target x86_64-unknown-linux-gnu

# KVM boots go through the harness one at a time: each starts its own L1.
kvm-test: test-tools guest virtiofsd
	cargo test --release -p moat-vmm --test boot --test seccomp --test virtio --test hostile --test fs --test agent --test shim -- --test-threads=1

## bench-boot: moat-vmm against QEMU microvm, boot time and peak RSS, and
## moat-vmm with memfd guest RAM (--shared-memory) beside them.
bench-boot: deps kernel build-release initramfs
	$(KVM_RUN) -- $(TARGET_DIR)/release/bench-boot \
		--vmm $(TARGET_DIR)/release/moat-vmm \
		--kernel "$$(kernel-config/build-kernel.sh | tail -n1)" \
		--initramfs $(TEST_INITRAMFS) --runs $${RUNS:-10}

## boot-rate: how many boots die or stall before the guest's init
## reports, moat-vmm against QEMU microvm (-cpu host) in one L1: the test
## and the agent initramfs, 1 and 2 vCPUs, idle and busy, RUNS boots of
## each VMM per cell (default 25: 200 boots of each VMM in all).
## BOOT_RATE_ARGS passes more (e.g. --vmms moat --loads busy).
boot-rate: deps kernel build-release initramfs guest
	$(KVM_RUN) --timeout $${TIMEOUT:-10800} -- bash -c 'modprobe vhost_vsock && exec "$$@"' boot-rate \
		tests/harness/l0-leak-watch $(TARGET_DIR)/release/boot-rate --vmm $(TARGET_DIR)/release/moat-vmm \
		--kernel "$$(kernel-config/build-kernel.sh | tail -n1)" \
		--test-initramfs $(TEST_INITRAMFS) --agent-initramfs $(AGENT_INITRAMFS) \
		--runs $${RUNS:-25} $${BOOT_RATE_ARGS:-}

## net-crash-rate: how many guests crash or stall under network load
## (256 MiB each way over TCP), moat-vmm against QEMU microvm with
## vhost-net in one L1, RUNS runs of each (default 6), alternating.
## NCR_VMMS=moat runs only moat-vmm; NCR_COMPACT_EVERY=S compacts L1's
## memory every S seconds; MOAT_HARNESS_NPT=1 puts L1's KVM on nested paging.
net-crash-rate: deps kernel build-release test-tools
	tests/guest/build-initramfs.sh $(TARGET_DIR)/moat-guest/net-initramfs.cpio \
		$(TARGET_DIR)/x86_64-unknown-linux-gnu/release/guest-tool >/dev/null
	$(KVM_RUN) --timeout $${TIMEOUT:-7200} -- tests/harness/l0-leak-watch tests/harness/net-crash-rate \
		$(TARGET_DIR)/release/moat-vmm "$$(kernel-config/build-kernel.sh | tail -n1)" \
		$(TARGET_DIR)/moat-guest/net-initramfs.cpio $(TARGET_DIR)/release/host-tool $${RUNS:-6}

## bench-devices: moat's virtio block, net and vsock against QEMU's
## (virtio-blk, vhost-net, vhost-vsock) on the same image and tap.
bench-devices: deps kernel build-release test-tools
	tests/guest/build-initramfs.sh $(TARGET_DIR)/moat-guest/bench-initramfs.cpio \
		$(TARGET_DIR)/x86_64-unknown-linux-gnu/release/guest-tool >/dev/null
	$(KVM_RUN) -- $(TARGET_DIR)/release/bench-devices \
		--vmm $(TARGET_DIR)/release/moat-vmm \
		--kernel "$$(kernel-config/build-kernel.sh | tail -n1)" \
		--initramfs $(TARGET_DIR)/moat-guest/bench-initramfs.cpio --runs $${RUNS:-3}

## bench-fs: virtio-fs, moat-vmm against QEMU microvm's vhost-user-fs-device
## with the same virtiofsd, tree and kernel (RUNS of each, default 3); ext4
## on moat's virtio-blk in the same guest as the reference; then moat-vmm
## under other virtiofsd cache modes and thread pools (SETTINGS), each in
## an L1 of its own, and the table of all. L1 idles by polling: see
## tests/harness/README.md ("L1 vCPUs left halted").
bench-fs: deps kernel build-release test-tools virtiofsd
	tests/guest/build-initramfs.sh $(TARGET_DIR)/moat-guest/bench-fs-initramfs.cpio \
		$(TARGET_DIR)/x86_64-unknown-linux-gnu/release/guest-tool >/dev/null
	tests/bench-fs-all $(TARGET_DIR)/bench-fs $(TARGET_DIR)/release/bench-fs \
		--vmm $(TARGET_DIR)/release/moat-vmm \
		--kernel "$$(kernel-config/build-kernel.sh | tail -n1)" \
		--initramfs $(TARGET_DIR)/moat-guest/bench-fs-initramfs.cpio \
		--guest-tool $(TARGET_DIR)/x86_64-unknown-linux-gnu/release/guest-tool \
		--virtiofsd "$$(tests/harness/install-virtiofsd | tail -n1)"

## bench-agent: moat-agent's container lifecycle against runc on this
## host (create, start, exit, delete of `true`), as a ratio.
bench-agent: deps build-release
	$(TARGET_DIR)/release/bench-agent $(TARGET_DIR)/release/moat-agent $${RUNS:-30}
