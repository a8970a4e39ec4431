//! virtio-fs: moat-vmm's vhost-user-fs frontend with the real virtiofsd
//! (crates.io, pinned by `tests/harness/install-virtiofsd`) and the guest
//! kernel's virtiofs driver, booted through the KVM test harness.
//!
//! One VM, three shares, the way the shim will set a pod up:
//! - `pod`: virtiofsd serves `pod/shared`, a read-only slave bind of
//!   `pod/rw` (a shared mount), into which the host bind-mounts the test's
//!   tree before virtiofsd starts and another folder after it started;
//! - `ctl`: the scenario's guest half (`guest.sh`) and the files host and
//!   guest hand each other to take turns (`--cache never`);
//! - `ro`: a share virtiofsd serves `--readonly`.
//!
//! The turns: the guest lists the tree (the host compares every entry);
//! changes it (the host compares again) and sees a change the host makes;
//! sees a bind mount the host adds under `pod/rw` and sees it go; is
//! refused writes with EROFS; and reads on while the host kills the `pod`
//! virtiofsd with SIGKILL, after which its reads fail with EIO while the
//! VMM runs on, until SIGTERM stops it cleanly.

mod common;

use common::{guest_vmlinux, kvm_run, test_initramfs_with, test_tool, virtiofsd, vmm_binary};

/// The guest half, run by the test initramfs's `fs` mode from the `ctl`
/// share. `turn NAME` tells the host a step is done and `await NAME`
/// waits for the host's answer (both files in the `ctl` share).
const GUEST_SCRIPT: &str = r#"
say() { echo "MOAT_GUEST fs $*"; }
turn() { : > "/ctl/out/$1"; echo "MOAT_GUEST fs step: $1"; }
await() {
  i=0
  while [ ! -e "/ctl/go/$1" ]; do
    i=$((i + 1)); [ $i -gt 1200 ] && { say "no answer from the host for $1"; return 1; }
    sleep 0.5
  done
}
mkdir -p /pod /ro
mount -t virtiofs pod /pod && mount -t virtiofs ro /ro
say "mounts: $(awk '$3 == "virtiofs" {printf "%s:%s ", $1, $2}' /proc/mounts)"

# 1. The tree as the host made it.
guest-tool fs-manifest /pod/tree > /ctl/out/read.manifest && turn read

# 2. Changes the host must see exactly.
cd /pod/tree/work
head -c 1048576 /dev/urandom > new.bin
say "new.bin sha256: $(sha256sum new.bin | cut -d' ' -f1)"
mv to-rename renamed
truncate -s 4096 to-truncate
chmod 0640 to-chmod
rm to-delete
mkdir made-dir && echo "made by the guest" > made-dir/note
ln -s renamed renamed-link
cd /
sync
guest-tool fs-manifest /pod/tree > /ctl/out/write.manifest && turn write

# 3. A change the host makes.
await changed
want=$(cat /ctl/go/changed)
i=0
while [ "$(sha256sum /pod/tree/small/d00/d00/f0001 | cut -d' ' -f1)" != "$want" ]; do
  i=$((i + 1)); [ $i -gt 60 ] && break
  sleep 0.5
done
[ $i -le 60 ] && say "host change seen: yes" || say "host change seen: no"

# 4. Mount propagation: a bind mount the host adds under pod/rw after
#    virtiofsd started, then takes away.
say "late before mount: $(ls /pod/late | wc -l) entries"
turn premount; await mounted
i=0
until [ -e /pod/late/marker ]; do i=$((i + 1)); [ $i -gt 60 ] && break; sleep 0.5; done
say "late mount: $(cat /pod/late/marker 2>&1), $(ls /pod/late | wc -l) entries"
turn seen; await unmounted
i=0
while [ -e /pod/late/marker ]; do i=$((i + 1)); [ $i -gt 60 ] && break; sleep 0.5; done
say "late after unmount: $(ls /pod/late | wc -l) entries"

# 5. Read-only: the ro share, and the top of the pod share (a read-only bind).
say "ro read: $(cat /ro/readme)"
say "ro share write: $(touch /ro/new 2>&1 || true)"
say "pod top write: $(touch /pod/new 2>&1 || true)"

# 6. The backend dies while the guest reads.
turn reading
fails=0; reads=0; err=
while [ $reads -lt 200 ]; do
  echo 3 > /proc/sys/vm/drop_caches
  if ! err=$(cat /pod/tree/big.bin 2>&1 >/dev/null); then fails=1; break; fi
  reads=$((reads + 1))
done
say "read after backend death: ${err:-no error after $reads reads}"
say "list after backend death: $(ls /pod/tree 2>&1 | head -n1)"
say "ctl share still works: $(echo yes > /ctl/out/alive && cat /ctl/out/alive)"
turn killed
# The host stops the VMM now; SIGTERM, not the guest, ends this VM.
sleep 600
"#;

#[test]
fn virtio_fs_shares_a_tree_both_ways_follows_mounts_and_survives_its_backend() {
    let guest_tool = test_tool("guest-tool");
    let initramfs = test_initramfs_with("virtio-fs", &[&guest_tool]);
    let script = format!(
        r#"set -uo pipefail
        # Every 30 s: the time, and any task stuck in D state (a hung
        # backend shows here; a silent L1 means L1 itself stopped).
        ( n=0; while sleep 30; do n=$((n+30)); echo "fs: at ${{n}} s, D-state tasks: $(ps -eo stat,pid,comm,wchan:32 | awk '$1 ~ /D/' | tr '\n' ';')"; done ) &
        watchdog=$!
        W=/tmp/moat-fs; rm -rf $W; mkdir -p $W/src $W/ctl/out $W/ctl/go $W/ro $W/late-src $W/pod/rw $W/pod/shared
        GT={guest_tool}
        $GT fs-make-tree $W/src || exit 1
        echo "read-only share" > $W/ro/readme
        echo "late content" > $W/late-src/marker; echo more > $W/late-src/second
        mkdir $W/pod/rw/tree $W/pod/rw/late
        # The shim's propagation: rw/ is a shared mount, shared/ a
        # read-only slave bind of it; virtiofsd serves shared/.
        mount --bind $W/pod/rw $W/pod/rw && mount --make-shared $W/pod/rw
        mount --bind $W/pod/rw $W/pod/shared && mount --make-slave $W/pod/shared
        mount -o remount,bind,ro $W/pod/shared
        mount --bind $W/src $W/pod/rw/tree
        cat > $W/ctl/guest.sh <<'GUEST'
{guest_script}
GUEST
        $GT fs-manifest $W/src > $W/host-read.manifest
        start() {{ tag=$1; dir=$2; shift 2
          {virtiofsd} --shared-dir "$dir" --socket-path $W/$tag.sock "$@" > $W/$tag.log 2>&1 &
          echo $! > $W/$tag.pid; }}
        start pod $W/pod/shared --cache auto
        start ctl $W/ctl --cache never
        start ro $W/ro --readonly
        for i in $(seq 100); do [ -S $W/pod.sock ] && [ -S $W/ctl.sock ] && [ -S $W/ro.sock ] && break; sleep 0.1; done
        {vmm} --kernel {kernel} --initramfs {initramfs} --vcpus 2 --memory 512 \
          --fs tag=pod,socket=$W/pod.sock --fs tag=ctl,socket=$W/ctl.sock --fs tag=ro,socket=$W/ro.sock \
          --append "quiet moat_mode=fs" 2> $W/vm.err &
        vm=$!
        diagnose() {{
          echo "fs: diagnosis: $1"
          kill -USR1 $vm; sleep 2
          for t in pod ctl ro; do
            pid=$(cat $W/$t.pid)
            for task in /proc/$pid/task/*; do
              echo "fs: $t virtiofsd thread $(basename $task) $(cut -d' ' -f2,3 $task/stat) wchan $(cat $task/wchan 2>/dev/null) syscall $(cut -d' ' -f1 $task/syscall 2>/dev/null)"
            done
            tail -n 20 $W/$t.log | sed "s/^/fs: $t log: /"
          done
        }}
        wait_for() {{
          for i in $(seq 480); do
            [ -e $W/ctl/out/$1 ] && return 0
            kill -0 $vm 2>/dev/null || {{ echo "fs: the VM ended before the guest's turn $1"; return 1; }}
            sleep 0.5
          done
          diagnose "no turn $1 from the guest in 240 s"; return 1
        }}
        go() {{ printf '%s' "${{2:-}}" > $W/ctl/go/$1.tmp; mv $W/ctl/go/$1.tmp $W/ctl/go/$1; }}
        compare() {{
          if diff $1 $2 > $W/diff.txt; then echo "fs: $3: identical, $(wc -l < $1) entries"
          else echo "fs: $3: differ"; head -n 40 $W/diff.txt; fi
        }}
        steps() {{
          wait_for read || return
          compare $W/host-read.manifest $W/ctl/out/read.manifest "tree read in the guest"
          echo "fs: host entries: $(grep -c . $W/host-read.manifest)"
          wait_for write || return
          $GT fs-manifest $W/src > $W/host-write.manifest
          compare $W/host-write.manifest $W/ctl/out/write.manifest "tree after the guest's changes"
          echo "fs: host new.bin sha256: $(sha256sum $W/src/work/new.bin | cut -d' ' -f1)"
          grep -E '^work/' $W/host-write.manifest | cut -f1-6 | sed 's/^/fs: host work: /'
          head -c 3000 /dev/urandom > $W/src/small/d00/d00/f0001
          go changed "$(sha256sum $W/src/small/d00/d00/f0001 | cut -d' ' -f1)"
          wait_for premount || return
          mount --bind $W/late-src $W/pod/rw/late && go mounted
          wait_for seen || return
          # Lazily, as the shim will: virtiofsd holds the propagated
          # copy busy while the guest has it open, and a plain umount of a
          # mount whose propagated copies are busy fails with EBUSY.
          umount -l $W/pod/rw/late && go unmounted
          wait_for reading || return
          sleep 3
          kill -9 "$(cat $W/pod.pid)" && echo "fs: killed the pod share's virtiofsd"
          wait_for killed || return
          kill -0 $vm 2>/dev/null && echo "fs: moat-vmm alive after its backend died: yes"
        }}
        steps
        kill $watchdog
        kill -TERM $vm 2>/dev/null; wait $vm; echo "fs: moat-vmm exit status after SIGTERM: $?"
        sed 's/^/fs: vmm stderr: /' $W/vm.err
        for i in $(seq 100); do
          left=0; for t in ctl ro; do kill -0 "$(cat $W/$t.pid)" 2>/dev/null && left=$((left + 1)); done
          [ $left = 0 ] && break; sleep 0.1
        done
        echo "fs: backends still running after the VMM stopped: $left"
        echo "fs: moat-vmm processes left: $(pgrep -c -x moat-vmm || true)"
        umount $W/pod/rw/tree; umount $W/pod/shared; umount $W/pod/rw
        echo "fs: mounts left under $W: $(grep -c " $W" /proc/mounts || true)"
        echo "fs: pod share's virtiofsd log: $(grep -ciE 'panic' $W/pod.log || true) panics""#,
        guest_tool = guest_tool.display(),
        guest_script = GUEST_SCRIPT.trim(),
        virtiofsd = virtiofsd().display(),
        vmm = vmm_binary().display(),
        kernel = guest_vmlinux().display(),
        initramfs = initramfs.display(),
    );
    // L0's TCG does not wake a halted L1 vCPU whose local APIC holds a
    // deliverable interrupt, and this scenario's stream of guest halts
    // and backend wake-ups hit that every time (3 runs in 3, L1 silent
    // from then on; tests/harness/README.md). L1 polls in idle instead.
    let l1_args = std::env::var("MOAT_HARNESS_KERNEL_ARGS").unwrap_or_default();
    std::env::set_var("MOAT_HARNESS_KERNEL_ARGS", format!("{l1_args} idle=poll"));
    let run = kvm_run(&["bash", "-c", &script]);
    let all = run.describe();
    let host = |key: &str| run.line_after(&format!("fs: {key}: "));
    let guest = |key: &str| run.guest_value(&format!("fs {key}"));

    let mounts = guest("mounts").unwrap_or_default();
    for share in ["ctl:/ctl", "pod:/pod", "ro:/ro"] {
        assert!(mounts.contains(share), "{share} mounted\n{all}");
    }
    let read = host("tree read in the guest").unwrap_or_default();
    assert!(read.starts_with("identical,"), "{all}");
    let entries: usize = host("host entries")
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(entries > 2000, "the whole tree was listed\n{all}");

    assert_eq!(
        host("tree after the guest's changes").map(|v| v.starts_with("identical,")),
        Some(true),
        "{all}"
    );
    assert_eq!(
        guest("new.bin sha256"),
        host("host new.bin sha256"),
        "{all}"
    );
    let work: Vec<&str> = run
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix("fs: host work: "))
        .collect();
    for expected in [
        "work/made-dir\tdir\t755",
        "work/made-dir/note\tfile\t644\t0\t0\t18",
        "work/new.bin\tfile\t644\t0\t0\t1048576",
        "work/renamed\tfile",
        "work/renamed-link\tsymlink",
        "work/to-chmod\tfile\t640",
        "work/to-truncate\tfile\t644\t0\t0\t4096",
    ] {
        assert!(
            work.iter().any(|l| l.starts_with(expected)),
            "{expected:?} on the host\n{all}"
        );
    }
    assert!(
        !work
            .iter()
            .any(|l| l.starts_with("work/to-delete") || l.starts_with("work/to-rename\t")),
        "deleted and renamed files are gone on the host\n{all}"
    );
    assert_eq!(guest("host change seen"), Some("yes"), "{all}");

    assert_eq!(guest("late before mount"), Some("0 entries"), "{all}");
    assert_eq!(
        guest("late mount"),
        Some("late content, 2 entries"),
        "{all}"
    );
    assert_eq!(guest("late after unmount"), Some("0 entries"), "{all}");

    assert_eq!(guest("ro read"), Some("read-only share"), "{all}");
    for key in ["ro share write", "pod top write"] {
        assert!(
            guest(key).is_some_and(|v| v.contains("Read-only file system")),
            "{key}: EROFS\n{all}"
        );
    }

    let after = guest("read after backend death").unwrap_or_default();
    assert!(
        after.contains("Input/output error"),
        "reads fail with EIO once virtiofsd is gone: {after:?}\n{all}"
    );
    assert!(
        guest("list after backend death").is_some_and(|v| v.contains("Input/output error")),
        "{all}"
    );
    assert_eq!(guest("ctl share still works"), Some("yes"), "{all}");
    assert_eq!(
        host("moat-vmm alive after its backend died"),
        Some("yes"),
        "{all}"
    );
    assert!(
        run.stdout
            .contains("hung up; the share's requests now fail with EIO"),
        "the VMM logs the backend's death\n{all}"
    );
    assert_eq!(
        host("moat-vmm exit status after SIGTERM"),
        Some("0"),
        "{all}"
    );
    assert_eq!(
        host("backends still running after the VMM stopped"),
        Some("0"),
        "{all}"
    );
    assert_eq!(host("moat-vmm processes left"), Some("0"), "{all}");
    assert!(
        host("mounts left under /tmp/moat-fs").is_some_and(|v| v == "0"),
        "{all}"
    );
    assert_eq!(run.code, 0, "{all}");
}
