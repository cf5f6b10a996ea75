//! Running work inside a network namespace. A netlink socket (and a `/proc/sys/net` file, and a child
//! process) belongs to the network namespace of the thread that creates it, so each piece of per-namespace
//! work runs on a short-lived scoped thread that has `setns(2)`-ed into the target. The caller's thread
//! (often a tokio worker) never changes namespace.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};

use super::error::DataplaneError;

/// Where a node's (or pod's) network namespace is: a path to a netns file, or `None` for the namespace
/// margay itself runs in.
pub type NetnsPath = Option<PathBuf>;

/// Open a netns file, checking it exists. The error names the path.
pub fn open_netns(path: &Path) -> Result<File, DataplaneError> {
    File::open(path).map_err(|source| DataplaneError::Netns {
        path: path.to_path_buf(),
        source,
    })
}

/// Run `f` on a fresh thread inside the network namespace at `path` (`None`: the current one). The thread
/// ends with `f`, so nothing else ever runs in a namespace it did not ask for.
pub fn in_netns<T, F>(path: Option<&Path>, f: F) -> Result<T, DataplaneError>
where
    T: Send,
    F: FnOnce() -> Result<T, DataplaneError> + Send,
{
    let file = match path {
        Some(p) => Some(open_netns(p)?),
        None => None,
    };
    std::thread::scope(|s| {
        let worker = s.spawn(move || {
            if let (Some(file), Some(p)) = (file.as_ref(), path) {
                setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| {
                    DataplaneError::Netns {
                        path: p.to_path_buf(),
                        source: std::io::Error::from_raw_os_error(e as i32),
                    }
                })?;
            }
            f()
        });
        match worker.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}
