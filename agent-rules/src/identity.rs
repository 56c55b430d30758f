//! Program identity as the kernel sees it.
//!
//! The kernel names a file by its super block's device number and its inode number. `stat(2)`
//! does not always say the same: on btrfs it reports the subvolume's own device, on overlayfs
//! the lower or upper file system's. So a path is resolved here through an open descriptor:
//! its inode number and mount id from /proc/self/fdinfo, and that mount's device from
//! /proc/self/mountinfo, which is the super block's.
//!
//! Copies (a copied binary, a download, a memfd) have new inodes; they are recognised by
//! content, a SHA-256 cached by device, inode and change time.

use std::{
    collections::HashMap,
    fs::File,
    io::Read,
    os::{
        fd::AsRawFd,
        unix::fs::{MetadataExt, OpenOptionsExt},
    },
    path::Path,
    sync::Mutex,
};

use agent_common::FileKey;
use sha2::{Digest, Sha256};

/// A file's SHA-256.
pub type Sha256Sum = [u8; 32];

/// Kernel device number (`MAJOR << 20 | MINOR`) of a major and minor.
pub fn kernel_dev(major: u32, minor: u32) -> u32 {
    (major << 20) | minor
}

/// Kernel device number of a user-space `st_dev`.
pub fn kernel_dev_of(st_dev: u64) -> u32 {
    kernel_dev(libc::major(st_dev), libc::minor(st_dev))
}

/// The identity of the open file `file`, as the kernel's programs see it.
pub fn key_of_open(file: &File) -> std::io::Result<FileKey> {
    let meta = file.metadata()?;
    let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", file.as_raw_fd()))
        .unwrap_or_default();
    let field = |name: &str| {
        fdinfo
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    let ino = field("ino:").unwrap_or(meta.ino());
    let dev = field("mnt_id:")
        .and_then(mount_dev)
        .unwrap_or_else(|| kernel_dev_of(meta.dev()));
    Ok(FileKey { ino, dev, pad: 0 })
}

/// Device and inode, as the kernel sees them, of the file `path` resolves to (symlinks
/// followed).
pub fn file_key(path: &Path) -> std::io::Result<FileKey> {
    key_of_open(&open_regular(path)?)
}

/// Like [`file_key`], for a path a watched task chose: anything but a regular file is refused
/// before it is opened (a FIFO would block the open for good).
pub fn regular_file_key(path: &Path) -> std::io::Result<FileKey> {
    key_of_open(&open_regular(path)?)
}

/// Opens `path` for reading if it is a regular file, without blocking on it.
fn open_regular(path: &Path) -> std::io::Result<File> {
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is not a regular file", path.display()),
        ));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    // The path may have been swapped for something else between the two looks.
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is not a regular file", path.display()),
        ));
    }
    Ok(file)
}

/// Largest file hashed (a bigger one cannot be checked, and counts as a copy of everything).
const MAX_HASHED: u64 = 1 << 30;

/// File systems whose files can change without their change time moving (in memory, through
/// a shared mapping) or whose server says what it likes (FUSE): a sum of such a file is never
/// kept.
fn volatile(file: &File) -> bool {
    // tmpfs, ramfs, hugetlbfs, FUSE.
    const VOLATILE: [i64; 4] = [0x0102_1994, 0x8584_58f6, 0x9584_58f6, 0x6573_5546];
    // SAFETY: fstatfs fills the zeroed buffer for a valid descriptor.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return true;
    }
    VOLATILE.contains(&(st.f_type as i64))
}

/// The super block device of mount `mnt_id`, from /proc/self/mountinfo.
fn mount_dev(mnt_id: u64) -> Option<u32> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let id: u64 = fields.next()?.parse().ok()?;
        if id != mnt_id {
            return None;
        }
        let (major, minor) = fields.nth(1)?.split_once(':')?;
        Some(kernel_dev(major.parse().ok()?, minor.parse().ok()?))
    })
}

/// SHA-256 of files, cached by device, inode and change time (any change to a file moves its
/// change time, so a cached sum is never stale).
#[derive(Debug, Default)]
pub struct Hasher {
    cache: Mutex<HashMap<(u64, u64, i64, i64), Sha256Sum>>,
}

/// Most cached sums; the cache is emptied when it grows past this.
const MAX_CACHED: usize = 4096;

impl Hasher {
    /// SHA-256 of the regular file at `path` (which may be a /proc/PID/exe or /proc/PID/fd/N
    /// link: it is opened, so deleted files and memfds hash too). Files over 1 GiB are not
    /// hashed (an error).
    pub fn sum(&self, path: &Path) -> std::io::Result<Sha256Sum> {
        let mut file = open_regular(path)?;
        let meta = file.metadata()?;
        if meta.len() > MAX_HASHED {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} is larger than {MAX_HASHED} bytes", path.display()),
            ));
        }
        let stamp = (meta.dev(), meta.ino(), meta.ctime(), meta.ctime_nsec());
        let keep = !volatile(&file);
        if keep {
            if let Some(sum) = self.lock().get(&stamp) {
                return Ok(*sum);
            }
        }
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        let sum: Sha256Sum = hasher.finalize().into();
        if keep {
            let mut cache = self.lock();
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
            cache.insert(stamp, sum);
        }
        Ok(sum)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(u64, u64, i64, i64), Sha256Sum>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Lower-case hex of a sum.
pub fn hex(sum: &Sha256Sum) -> String {
    sum.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_to_a_file_has_one_key() {
        // /bin is a symlink to /usr/bin on Debian 12.
        let a = file_key(Path::new("/bin/sh")).unwrap();
        let b = file_key(Path::new("/usr/bin/sh")).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, file_key(Path::new("/usr/bin/env")).unwrap());
    }

    #[test]
    fn key_device_is_the_mounts_super_block() {
        let file = File::open("/proc/self/exe").unwrap();
        let key = key_of_open(&file).unwrap();
        // On ext4 and tmpfs the super block and stat agree; the key must not be empty.
        assert!(key.ino > 0 && key.dev > 0, "{key:?}");
        let fdinfo =
            std::fs::read_to_string(format!("/proc/self/fdinfo/{}", file.as_raw_fd())).unwrap();
        assert!(fdinfo.contains("mnt_id:"), "{fdinfo}");
    }

    #[test]
    fn fifos_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("f");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(regular_file_key(&fifo).is_err());
        assert!(Hasher::default().sum(&fifo).is_err());
    }

    #[test]
    fn copies_hash_alike_and_changes_are_seen() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        std::fs::write(&a, b"program").unwrap();
        std::fs::copy(&a, &b).unwrap();
        let h = Hasher::default();
        assert_eq!(h.sum(&a).unwrap(), h.sum(&b).unwrap());
        let expected: Sha256Sum = Sha256::digest(b"program").into();
        assert_eq!(h.sum(&a).unwrap(), expected);
        std::thread::sleep(std::time::Duration::from_millis(10));
        std::fs::write(&a, b"changed").unwrap();
        assert_ne!(
            h.sum(&a).unwrap(),
            h.sum(&b).unwrap(),
            "a stale sum was served"
        );
    }
}
