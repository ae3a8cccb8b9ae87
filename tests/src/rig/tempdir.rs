//! [`TempDir`]: a uniquely named directory under `std::env::temp_dir()`, removed on drop.
//!
//! Owns only the directory's lifetime; what goes in it (configs, certs, logs, sockets) is the
//! caller's. No crate for this: `create_dir` failing on an existing path is all the uniqueness
//! check needed.

use std::path::{Path, PathBuf};

/// A directory `tern-<tag>-<pid>-<n>` under the system temp dir; Drop removes it recursively.
#[derive(Debug)]
pub struct TempDir {
    /// Exists and is ours for as long as `self` lives.
    path: PathBuf,
}

impl TempDir {
    /// Creates a fresh directory (mode from the umask). Panics if that is impossible.
    #[track_caller]
    pub fn new(tag: &str) -> TempDir {
        let base = std::env::temp_dir();
        let pid = std::process::id();
        let mut last_error = None;
        // A clash means a stale directory from a dead process with our PID; take the next id.
        for _ in 0..64 {
            let path = base.join(format!("tern-{tag}-{pid}-{}", super::next_id()));
            match std::fs::create_dir(&path) {
                Ok(()) => return TempDir { path },
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last_error = Some(e),
                Err(e) => panic!("tempdir: cannot create {}: {e}", path.display()),
            }
        }
        panic!(
            "tempdir: no free name under {} ({last_error:?})",
            base.display()
        );
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `self.path().join(name)`.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            eprintln!("tempdir: could not remove {}: {e}", self.path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_and_removed_on_drop() {
        let a = TempDir::new("unit");
        let b = TempDir::new("unit");
        assert_ne!(a.path(), b.path(), "two temp dirs share a path");
        std::fs::write(a.join("f"), b"x").expect("write into temp dir");
        let kept = a.path().to_path_buf();
        drop(a);
        assert!(!kept.exists(), "{} still exists after drop", kept.display());
        assert!(b.path().is_dir(), "the other temp dir vanished");
    }
}
