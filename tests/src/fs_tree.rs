//! The file tree of the virtio-fs scenarios and its manifest: the test
//! builds the tree on the host, and the host and the guest each list it
//! (every entry's type, mode, owner, size, SHA-256 or link target, and
//! which paths are hard links of one another) so that the two views can be
//! compared line by line.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{chown, FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Size of the tree's large random file.
pub const BIG_FILE_BYTES: u64 = 64 << 20;
/// How many small files the tree holds, over nested folders.
pub const SMALL_FILES: usize = 2000;
/// Size of the sparse file, and where its only data lies.
pub const SPARSE_BYTES: u64 = 16 << 20;
const SPARSE_DATA_AT: u64 = 8 << 20;

/// A fast deterministic byte stream (xorshift64*), so that the tree's
/// contents are "random" but cost nothing to make.
struct Pattern(u64);

impl Pattern {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let word = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }
}

fn write_pattern(path: &Path, seed: u64, len: u64) -> io::Result<()> {
    let mut file = File::create(path)?;
    let mut pattern = Pattern(seed | 1);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        pattern.fill(&mut buf[..n]);
        file.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// Builds the scenario's tree in `root` (which must be empty or absent):
/// - `big.bin`, 64 MiB of random bytes;
/// - `small/dNN/dMM/fNNNN`, 2,000 files of 0 to 8 KiB in 100 folders;
/// - `link` (symlink to `big.bin`) and `dangling` (symlink to nothing);
/// - `hardlink`, a second name of `small/d00/d00/f0000`;
/// - `sparse.bin`, 16 MiB with one 4 KiB block of data in the middle;
/// - `empty`, no bytes; `secret`, mode 0600 owned by uid and gid 1000;
/// - `work/`, the files the guest changes: `to-rename`, `to-truncate`
///   (1 MiB), `to-chmod` (0644) and `to-delete`.
pub fn make_tree(root: &Path) -> io::Result<()> {
    fs::create_dir_all(root)?;
    write_pattern(&root.join("big.bin"), 1, BIG_FILE_BYTES)?;
    let mut n = 0usize;
    for top in 0..20 {
        for sub in 0..5 {
            let dir = root.join(format!("small/d{top:02}/d{sub:02}"));
            fs::create_dir_all(&dir)?;
            for _ in 0..SMALL_FILES / 100 {
                let len = (n as u64 * 397) % 8193;
                write_pattern(&dir.join(format!("f{n:04}")), 1000 + n as u64, len)?;
                n += 1;
            }
        }
    }
    std::os::unix::fs::symlink("big.bin", root.join("link"))?;
    std::os::unix::fs::symlink("nowhere/at/all", root.join("dangling"))?;
    fs::hard_link(root.join("small/d00/d00/f0000"), root.join("hardlink"))?;
    let sparse = File::create(root.join("sparse.bin"))?;
    sparse.set_len(SPARSE_BYTES)?;
    let mut block = vec![0u8; 4096];
    Pattern(7).fill(&mut block);
    sparse.write_all_at(&block, SPARSE_DATA_AT)?;
    File::create(root.join("empty"))?;
    let secret = root.join("secret");
    write_pattern(&secret, 3, 1000)?;
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600))?;
    chown(&secret, Some(1000), Some(1000))?;
    let work = root.join("work");
    fs::create_dir_all(&work)?;
    for (name, len) in [
        ("to-rename", 5000),
        ("to-truncate", 1 << 20),
        ("to-chmod", 100),
        ("to-delete", 100),
    ] {
        write_pattern(&work.join(name), len, len)?;
    }
    fs::set_permissions(work.join("to-chmod"), fs::Permissions::from_mode(0o644))?;
    Ok(())
}

/// The SHA-256 of a file's contents, in hex.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
    let mut entries = fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<io::Result<Vec<_>>>()?;
    entries.sort();
    for path in entries {
        out.push(path.strip_prefix(root).unwrap_or(&path).to_path_buf());
        if fs::symlink_metadata(&path)?.is_dir() {
            walk(root, &path, out)?;
        }
    }
    Ok(())
}

/// The manifest of the tree under `root`: one line per entry, sorted by
/// path, `PATH TYPE MODE UID GID SIZE DETAIL` separated by tabs, where
/// DETAIL is a file's SHA-256 (and `=FIRST` when it is a hard link of the
/// earlier path FIRST), a symlink's target, or `-` for a folder. Folder
/// sizes are left out: they are the host file system's business.
pub fn manifest(root: &Path) -> io::Result<String> {
    let mut paths = Vec::new();
    walk(root, root, &mut paths)?;
    let mut first_name: HashMap<(u64, u64), String> = HashMap::new();
    let mut text = String::new();
    for rel in paths {
        let path = root.join(&rel);
        let meta = fs::symlink_metadata(&path)?;
        let name = rel.to_string_lossy().into_owned();
        let kind = meta.file_type();
        let (kind, size, detail) = if kind.is_symlink() {
            let target = fs::read_link(&path)?;
            ("symlink", meta.len(), target.to_string_lossy().into_owned())
        } else if kind.is_dir() {
            ("dir", 0, "-".to_string())
        } else if kind.is_file() {
            let mut detail = sha256_file(&path)?;
            if meta.nlink() > 1 {
                let first = first_name
                    .entry((meta.dev(), meta.ino()))
                    .or_insert_with(|| name.clone());
                if *first != name {
                    detail.push_str(&format!(" ={first}"));
                }
            }
            ("file", meta.len(), detail)
        } else {
            ("other", meta.len(), "-".to_string())
        };
        let _ = writeln!(
            text,
            "{name}\t{kind}\t{:o}\t{}\t{}\t{size}\t{detail}",
            meta.mode() & 0o7777,
            meta.uid(),
            meta.gid()
        );
    }
    Ok(text)
}

/// Builds `entries` folder entries under `root` for the metadata walk of
/// `make bench-fs`: 100 folders of empty files (10,000 entries in all by
/// default, folders included).
pub fn make_wide_tree(root: &Path, entries: usize) -> io::Result<()> {
    let per_dir = entries.div_ceil(100).saturating_sub(1);
    for d in 0..100 {
        let dir = root.join(format!("d{d:03}"));
        fs::create_dir_all(&dir)?;
        for f in 0..per_dir {
            File::create(dir.join(format!("f{f:04}")))?;
        }
    }
    Ok(())
}

/// Drops the guest's page, dentry and inode caches, so that a measured
/// pass reaches the device (the guest runs as root).
pub fn drop_caches() {
    let _ = fs::write("/proc/sys/vm/drop_caches", "3");
}

/// One figure of [`bench`]: its name and value.
pub type Figure = (&'static str, f64);

/// The file system benchmark of `make bench-fs`, run in the guest on the
/// folder `dir` (a virtio-fs share or an ext4 disk): sequential write
/// (with fsync) and read of a `file_mib` MiB file in 1 MiB requests, 4 KiB
/// random reads of it for `rand_secs` seconds (O_DIRECT where the file
/// system takes it, so each read reaches the device), create + stat +
/// unlink of 2,000 files, and a walk that stats every entry of the tree
/// `wide` (made by [`make_wide_tree`]).
pub fn bench(dir: &Path, wide: &Path, file_mib: u64, rand_secs: u64) -> io::Result<Vec<Figure>> {
    use std::time::{Duration, Instant};
    let path = dir.join("bench-file");
    let bytes = file_mib << 20;
    let mut buf = vec![0u8; 1 << 20];
    Pattern(5).fill(&mut buf);
    let start = Instant::now();
    {
        let mut file = File::create(&path)?;
        for _ in 0..file_mib {
            file.write_all(&buf)?;
        }
        file.sync_all()?;
    }
    let write = bytes as f64 / start.elapsed().as_secs_f64() / 1048576.0;
    drop_caches();
    let start = Instant::now();
    let mut file = File::open(&path)?;
    let mut read_bytes = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        read_bytes += n as u64;
    }
    let read = read_bytes as f64 / start.elapsed().as_secs_f64() / 1048576.0;
    drop_caches();
    let direct = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags_direct()
        .open(&path);
    let file = match direct {
        Ok(file) => file,
        Err(_) => File::open(&path)?,
    };
    // O_DIRECT wants an aligned buffer: a 4 KiB-aligned window of a larger one.
    let mut raw = vec![0u8; 8192];
    let offset = raw.as_ptr().align_offset(4096);
    let block = &mut raw[offset..offset + 4096];
    let mut rng = Pattern(11);
    let blocks = bytes / 4096;
    let mut reads = 0u64;
    let start = Instant::now();
    let deadline = Duration::from_secs(rand_secs);
    while start.elapsed() < deadline {
        let mut word = [0u8; 8];
        rng.fill(&mut word);
        let at = (u64::from_le_bytes(word) % blocks) * 4096;
        file.read_exact_at(block, at)?;
        reads += 1;
    }
    let iops = reads as f64 / start.elapsed().as_secs_f64();
    fs::remove_file(&path)?;

    let meta_dir = dir.join("bench-meta");
    fs::create_dir_all(&meta_dir)?;
    let start = Instant::now();
    let names: Vec<PathBuf> = (0..2000)
        .map(|i| meta_dir.join(format!("m{i:04}")))
        .collect();
    for name in &names {
        File::create(name)?;
    }
    for name in &names {
        fs::metadata(name)?;
    }
    for name in &names {
        fs::remove_file(name)?;
    }
    let meta_ops = (3 * names.len()) as f64 / start.elapsed().as_secs_f64();
    fs::remove_dir(&meta_dir)?;

    drop_caches();
    let start = Instant::now();
    let mut paths = Vec::new();
    walk(wide, wide, &mut paths)?;
    for rel in &paths {
        fs::symlink_metadata(wide.join(rel))?;
    }
    let walk_secs = start.elapsed().as_secs_f64();
    Ok(vec![
        ("seq-write MiB/s", write),
        ("seq-read MiB/s", read),
        ("4k rand-read IOPS", iops),
        ("create+stat+unlink ops/s", meta_ops),
        ("find+stat s", walk_secs),
        ("find+stat entries", paths.len() as f64),
    ])
}

/// `O_DIRECT` for [`std::fs::OpenOptions`].
trait DirectOpen {
    fn custom_flags_direct(&mut self) -> &mut Self;
}

impl DirectOpen for std::fs::OpenOptions {
    fn custom_flags_direct(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_DIRECT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_and_its_manifest() {
        let root = std::env::temp_dir().join(format!("moat-fs-tree-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        make_tree(&root).unwrap();
        let text = manifest(&root).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let files = lines.iter().filter(|l| l.contains("\tfile\t")).count();
        // 2,000 small files, big.bin, hardlink, sparse.bin, empty, secret
        // and the four in work/.
        assert_eq!(files, SMALL_FILES + 9, "{text}");
        let line = |name: &str| {
            lines
                .iter()
                .find(|l| l.starts_with(&format!("{name}\t")))
                .unwrap_or_else(|| panic!("{name} missing"))
                .to_string()
        };
        assert!(
            line("hardlink").ends_with(" =small/d00/d00/f0000") || {
                // Sorted order puts "hardlink" after "big.bin" but before
                // "small/", so the small file is the one marked.
                line("small/d00/d00/f0000").ends_with(" =hardlink")
            }
        );
        assert!(line("link").ends_with("\tsymlink\t777\t0\t0\t7\tbig.bin"));
        assert!(line("secret").contains("\tfile\t600\t1000\t1000\t1000\t"));
        assert!(line("sparse.bin").contains(&format!("\t{SPARSE_BYTES}\t")));
        assert!(fs::metadata(root.join("sparse.bin")).unwrap().blocks() < 64);
        assert_eq!(manifest(&root).unwrap(), text, "the manifest is stable");
        fs::remove_dir_all(&root).unwrap();
    }
}
