#!/usr/bin/env bash
# Builds the quiver module against Debian's packaged kernel headers, boots that
# packaged kernel under qemu (TCG: no KVM needed) with an initramfs holding
# busybox, the module, the static C tests and Node with the shm addon, runs
# every test and the benchmark inside, and fails on any failed test or any
# BUG:/WARNING:/Oops/leak in the kernel log.
#
#   kmod/test/run-vm.sh            (npm run test:kmod)
#   QUIVER_VM_TIMEOUT=900 ...      seconds before the VM is killed (default 600)
#   QUIVER_VM_BENCH_MIB=256        size of the benchmark's output (0 skips it)
#   QUIVER_VM_KEEP=1               keep the work directory (printed) for a look
#
# Exit 0: everything passed, or the harness cannot run here at all (not root,
# or packages missing and apt unreachable): it then says why on one line.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
kmod="$(dirname "$here")"
repo="$(dirname "$kmod")"
timeout_s="${QUIVER_VM_TIMEOUT:-600}"
bench_mib="${QUIVER_VM_BENCH_MIB:-256}"

say() { echo "kmod-vm: $*"; }
skip() { say "SKIPPED: $*"; exit 0; }
die() { say "FAILED: $*"; exit 1; }

[ "$(id -u)" = 0 ] || skip "needs root to install the kernel, headers and qemu packages"

# ---- packages ---------------------------------------------------------------
need=()
dpkg-query -W -f='${Status}\n' linux-image-amd64 2>/dev/null | grep -q 'install ok installed' || need+=(linux-image-amd64)
dpkg-query -W -f='${Status}\n' linux-headers-amd64 2>/dev/null | grep -q 'install ok installed' || need+=(linux-headers-amd64)
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
# The static build: the initramfs has no libc for a dynamic busybox.
dpkg-query -W -f='${Status}\n' busybox-static 2>/dev/null | grep -q 'install ok installed' || need+=(busybox-static)
command -v cpio >/dev/null || need+=(cpio)
command -v gcc >/dev/null && command -v make >/dev/null || need+=(build-essential)
[ -f /usr/lib/x86_64-linux-gnu/libc.a ] || need+=(libc6-dev)
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # The lock keeps this from racing other apt users on a shared machine.
  if ! flock /tmp/quiver-apt.lock sh -c 'apt-get update -qq && apt-get install -y -qq --no-install-recommends "$@"' sh "${need[@]}" >/tmp/quiver-kmod-apt.log 2>&1; then
    if grep -qiE 'could not resolve|failed to fetch|temporary failure|unable to connect|network is unreachable' /tmp/quiver-kmod-apt.log; then
      skip "apt cannot reach the Debian archive to install ${need[*]} (see /tmp/quiver-kmod-apt.log)"
    fi
    tail -20 /tmp/quiver-kmod-apt.log
    die "apt-get install ${need[*]} failed"
  fi
fi

# The kernel the VM boots: whatever linux-image-amd64 currently depends on.
kver="$(dpkg-query -W -f='${Depends}' linux-image-amd64 | grep -o 'linux-image-[^ ,]*' | head -1 | sed 's/^linux-image-//')"
kernel="/boot/vmlinuz-$kver"
[ -f "$kernel" ] || die "no $kernel for linux-image-amd64's kernel $kver"
[ -d "/lib/modules/$kver/build" ] || die "no headers at /lib/modules/$kver/build (linux-headers-$kver)"
say "kernel $kver"

work="$(mktemp -d /tmp/quiver-kmod-vm.XXXXXX)"
if [ "${QUIVER_VM_KEEP:-0}" = 1 ]; then say "work directory $work (kept)"; else trap 'rm -rf "$work"' EXIT; fi

# ---- build --------------------------------------------------------------------
# Out of the source tree, so the build leaves nothing in kmod/.
mkdir -p "$work/build" "$work/root/quiver"
cp "$kmod/quiver.c" "$kmod/quiver_uapi.h" "$kmod/Kbuild" "$kmod/Makefile" "$work/build/"
make -s -C "$work/build" KVER="$kver" >"$work/build.log" 2>&1 || { cat "$work/build.log"; die "module build failed"; }
grep -E 'warning|error' "$work/build.log" | grep -v 'Skipping BTF' && die "the module build printed warnings"
gcc -static -O2 -Wall -Wextra -Werror -I"$kmod" -o "$work/root/quiver/quiver-test" "$here/quiver_test.c" || die "test build failed"
say "built quiver.ko and quiver-test"

# ---- initramfs ------------------------------------------------------------------
root="$work/root"
mkdir -p "$root"/{bin,sbin,proc,sys,dev,tmp,lib64,etc,quiver}
cp /bin/busybox "$root/bin/busybox"
cp "$work/build/quiver.ko" "$root/quiver/"
node_bin="$(command -v node)"
node_test=0
if [ -f "$here/node-region.ts" ] && [ -f "$repo/shm/addon/build/Release/quiver_shm.node" ] && [ -x "$repo/node_modules/.bin/esbuild" ]; then
  # Node and the libraries it links, at the same paths as here.
  cp "$node_bin" "$root/bin/node"
  for lib in $(ldd "$node_bin" "$repo/shm/addon/build/Release/quiver_shm.node" | grep -oE '/[^ ]+\.so[^ ]*' | sort -u); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
  mkdir -p "$root/quiver/addon/build/Release"
  cp "$repo/shm/addon/build/Release/quiver_shm.node" "$root/quiver/addon/build/Release/"
  # One self-contained file: shm/, apache-arrow and the test; the addon is loaded from ./addon beside it.
  "$repo/node_modules/.bin/esbuild" "$here/node-region.ts" --bundle --platform=node --format=esm --target=node20 \
    --outfile="$root/quiver/node-region.mjs" --log-level=warning \
    --banner:js="import { createRequire as __cr } from 'node:module'; const require = __cr(import.meta.url);" \
    || die "bundling the Node test failed"
  node_test=1
else
  say "no Node test: it needs kmod/test/node-region.ts, the shm addon (npm run build:addon) and esbuild (npm ci)"
fi

cat >"$root/init" <<INIT
#!/bin/busybox sh
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/shm
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
echo "== insmod"
insmod /quiver/quiver.ko && echo "insmod ok" || echo "not ok - insmod failed"
echo "== C tests"
/quiver/quiver-test
if [ $node_test = 1 ]; then
  echo "== Node test"
  cd /quiver && node node-region.mjs
  cd /
fi
if [ $bench_mib -gt 0 ]; then
  echo "== benchmark"
  /quiver/quiver-test bench $bench_mib || echo "not ok - benchmark failed"
  if [ $node_test = 1 ]; then cd /quiver && node node-region.mjs bench $bench_mib || echo "not ok - Node benchmark failed"; cd /; fi
fi
echo "== rmmod"
/quiver/quiver-test rmmod
echo "== kernel log"
dmesg
echo "== end of kernel log"
poweroff -f
INIT
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet >"$work/initramfs.cpio")
say "initramfs $(du -m "$work/initramfs.cpio" | cut -f1) MiB; booting (tcg, timeout ${timeout_s}s)"

# ---- boot -------------------------------------------------------------------------
log="$work/console.log"
start=$(date +%s)
set +e
timeout "$timeout_s" qemu-system-x86_64 -accel tcg -smp 2 -m 2048 -nographic -no-reboot \
  -kernel "$kernel" -initrd "$work/initramfs.cpio" \
  -append "console=ttyS0 panic=-1 loglevel=4 rdinit=/init" </dev/null >"$log" 2>&1
qemu_status=$?
set -e
tr -d '\r' <"$log" >"$log.txt"
log="$log.txt"
say "VM ran $(( $(date +%s) - start ))s (qemu exit $qemu_status)"

# ---- verdict ------------------------------------------------------------------------
sed -n '/^== insmod/,/^== kernel log/p' "$log" | grep -v '^== kernel log'
problems=()
[ "$qemu_status" = 124 ] && problems+=("the VM timed out after ${timeout_s}s")
grep -q '^== end of kernel log' "$log" || problems+=("the VM did not reach the end of its script")
grep -q '^insmod ok' "$log" || problems+=("insmod failed")
kernel_log="$(sed -n '/^== kernel log/,/^== end of kernel log/p' "$log")"
bad_kernel="$(grep -E 'BUG:|WARNING:|Oops|leak|Kernel panic|Call Trace' <<<"$kernel_log" || true)"
[ -n "$bad_kernel" ] && problems+=("kernel log: $(head -5 <<<"$bad_kernel" | tr '\n' ' ')")
tests_passed=$(grep -c '^ok - ' "$log" || true)
tests_failed=$(grep -c '^not ok - ' "$log" || true)
[ "$tests_failed" -gt 0 ] && problems+=("$tests_failed test(s) failed")
if [ "$node_test" = 1 ] && ! grep -q '^ok - node:' "$log"; then problems+=("the Node test did not pass"); fi
[ "$tests_passed" -lt 9 ] && problems+=("only $tests_passed tests passed")

echo
if [ ${#problems[@]} -gt 0 ]; then
  say "console log tail:"; tail -40 "$log"
  for p in "${problems[@]}"; do say "problem: $p"; done
  cp "$log" /tmp/quiver-kmod-vm-console.log
  say "full console log: /tmp/quiver-kmod-vm-console.log"
  [ "$tests_failed" = 0 ] && tests_failed=1
  echo "kmod: $tests_passed passed, $tests_failed failed"
  exit 1
fi
say "all tests passed on kernel $kver; kernel log clean"
echo "kmod: $tests_passed passed, 0 failed"
