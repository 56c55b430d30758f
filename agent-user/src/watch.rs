//! Whom the agent watches, and keeping what it loaded current.
//!
//! Accounts, groups, cgroups and units in `[watch]` resolve to uids, gids and cgroup ids; a
//! watched cgroup covers its sub-cgroups. Things change under a running agent: systemd
//! re-creates a unit's cgroup when it restarts it (the kernel side watches a cgroup made at a
//! watched path from its creation on), and a package upgrade replaces a rule's binary by
//! rename, which gives it a new inode. [`PathWatch`] notices both through inotify on the
//! directories involved, and the agent then reloads its tables.

use std::{
    os::{
        fd::{AsFd, AsRawFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
};

use agent_common::CgroupPath;
use anyhow::{bail, Context, Result};
use nix::{
    sys::inotify::{AddWatchFlags, InitFlags, Inotify},
    unistd::{Group, User},
};
use tokio::io::unix::AsyncFd;

use crate::{bpf::cgroup_path_key, config::WatchSection};

/// Resolved watch list.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Watch {
    /// uids.
    pub uids: Vec<u32>,
    /// gids.
    pub gids: Vec<u32>,
    /// cgroup ids (inode numbers of cgroup v2 directories), sub-cgroups included.
    pub cgroups: Vec<u64>,
    /// The watched cgroups' paths, relative to the cgroup root: a cgroup made at one of them
    /// later is watched from its creation.
    pub cgroup_paths: Vec<CgroupPath>,
}

/// The cgroup directories `w` names (cgroups, then units under system.slice).
pub fn cgroup_dirs(w: &WatchSection, cgroup_root: &Path) -> Vec<PathBuf> {
    w.cgroups
        .iter()
        .map(|c| {
            if Path::new(c).starts_with(cgroup_root) {
                PathBuf::from(c)
            } else {
                cgroup_root.join(c.trim_start_matches('/'))
            }
        })
        .chain(
            w.units
                .iter()
                .map(|u| cgroup_root.join("system.slice").join(u)),
        )
        .collect()
}

/// Resolves account, group, cgroup and unit names. Unknown accounts are errors; a cgroup or
/// unit that does not exist (yet) is a warning, since units come and go: its path is watched,
/// and the kernel side watches it from the moment it is made.
pub fn resolve(w: &WatchSection, cgroup_root: &Path) -> Result<Watch> {
    let mut out = Watch::default();
    for u in &w.users {
        let uid = match u.parse::<u32>() {
            Ok(n) => n,
            Err(_) => User::from_name(u)
                .with_context(|| format!("looking up account {u:?}"))?
                .with_context(|| {
                    format!("watch.users: there is no account named {u:?} on this host")
                })?
                .uid
                .as_raw(),
        };
        out.uids.push(uid);
    }
    for g in &w.groups {
        let gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => Group::from_name(g)
                .with_context(|| format!("looking up group {g:?}"))?
                .with_context(|| {
                    format!("watch.groups: there is no group named {g:?} on this host")
                })?
                .gid
                .as_raw(),
        };
        out.gids.push(gid);
    }
    for dir in cgroup_dirs(w, cgroup_root) {
        let relative = dir.strip_prefix(cgroup_root).unwrap_or(&dir);
        match cgroup_path_key(&relative.to_string_lossy()) {
            Some(key) => out.cgroup_paths.push(key),
            None => {
                tracing::warn!(cgroup = %dir.display(), "cgroup path too long to be watched across restarts")
            }
        }
        match std::fs::metadata(&dir) {
            Ok(m) if m.is_dir() => collect_cgroups(&dir, &mut out.cgroups),
            Ok(_) => bail!("watch: {} is not a cgroup directory", dir.display()),
            Err(e) => {
                tracing::warn!(cgroup = %dir.display(), error = %e, "cgroup not found (unit not running?); watched from when it is made")
            }
        }
    }
    Ok(out)
}

/// `dir`'s id and those of every cgroup below it.
fn collect_cgroups(dir: &Path, out: &mut Vec<u64>) {
    let Ok(meta) = std::fs::metadata(dir) else {
        return;
    };
    out.push(meta.ino());
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_cgroups(&e.path(), out);
            }
        }
    }
}

/// inotify on the directories holding the files the agent loaded (rule binaries, watched
/// cgroups): any creation, rename, deletion or attribute change there wakes [`changed`].
///
/// [`changed`]: PathWatch::changed
pub struct PathWatch {
    /// The inotify instance (its watches), read through `fd`, a duplicate of its descriptor.
    _inotify: Inotify,
    fd: AsyncFd<std::os::fd::OwnedFd>,
}

impl PathWatch {
    /// Watches the parent directories of `paths` (those that exist).
    pub fn new<'a>(paths: impl IntoIterator<Item = &'a Path>) -> Result<Self> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .context("inotify_init")?;
        let mask = AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_ATTRIB
            | AddWatchFlags::IN_CLOSE_WRITE;
        let mut dirs: Vec<&Path> = paths.into_iter().filter_map(Path::parent).collect();
        dirs.sort();
        dirs.dedup();
        for d in dirs {
            if let Err(e) = inotify.add_watch(d, mask) {
                tracing::debug!(dir = %d.display(), error = %e, "not watching for changes");
            }
        }
        let fd = inotify
            .as_fd()
            .try_clone_to_owned()
            .context("duplicating the inotify descriptor")?;
        // SAFETY: the descriptor is owned by the AsyncFd and stays open for its whole life.
        let fd = unsafe { AsyncFd::register(fd) }.context("registering inotify")?;
        Ok(Self {
            _inotify: inotify,
            fd,
        })
    }

    /// Waits until something changed in a watched directory (events are drained: which file
    /// changed does not matter, everything loaded is checked again).
    pub async fn changed(&self) -> Result<()> {
        let mut buf = [0u8; 4096];
        loop {
            let mut guard = self.fd.readable().await?;
            match nix::unistd::read(guard.get_inner().as_raw_fd(), &mut buf) {
                Ok(n) if n > 0 => return Ok(()),
                Ok(_) | Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_names_and_numbers() {
        let w = WatchSection {
            users: vec!["root".into(), "1234".into()],
            groups: vec!["root".into()],
            cgroups: vec![],
            units: vec![],
        };
        let r = resolve(&w, Path::new("/sys/fs/cgroup")).unwrap();
        assert_eq!(r.uids, vec![0, 1234]);
        assert_eq!(r.gids, vec![0]);
    }

    #[test]
    fn unknown_account_is_a_clear_error() {
        let w = WatchSection {
            users: vec!["no-such-account-airlock".into()],
            ..Default::default()
        };
        let err = format!(
            "{:#}",
            resolve(&w, Path::new("/sys/fs/cgroup")).unwrap_err()
        );
        assert!(
            err.contains("no account named \"no-such-account-airlock\""),
            "{err}"
        );
    }

    #[test]
    fn cgroup_dir_covers_its_children_and_its_path_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("app.slice/job-1")).unwrap();
        let w = WatchSection {
            cgroups: vec!["app.slice".into()],
            units: vec!["gone.service".into()],
            ..Default::default()
        };
        let r = resolve(&w, dir.path()).unwrap();
        let ino = |p: &str| std::fs::metadata(dir.path().join(p)).unwrap().ino();
        assert_eq!(r.cgroups, vec![ino("app.slice"), ino("app.slice/job-1")]);
        assert_eq!(
            r.cgroup_paths,
            vec![
                cgroup_path_key("app.slice").unwrap(),
                cgroup_path_key("system.slice/gone.service").unwrap()
            ],
            "a unit not running now is watched by path"
        );
    }

    #[tokio::test]
    async fn a_rename_over_a_watched_file_is_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("kubectl");
        std::fs::write(&bin, b"v1").unwrap();
        let watch = PathWatch::new([bin.as_path()]).unwrap();
        let new = dir.path().join("kubectl.new");
        std::fs::write(&new, b"v2").unwrap();
        std::fs::rename(&new, &bin).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), watch.changed())
            .await
            .expect("the rename was not noticed")
            .unwrap();
    }
}
