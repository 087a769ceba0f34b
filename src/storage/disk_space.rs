//! Free-space monitor for a data directory.
//!
//! Owns: the cached free-byte count that `append` checks (one `Cell` read, no syscall per append)
//! and its refresh through `statvfs`. Depends on libc only. Produce is refused while free space is
//! below the reserve; fetch, retention and deletion never consult it.

use std::cell::Cell;
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

pub struct DiskSpace {
    dir: PathBuf,
    reserve_bytes: u64,
    free_bytes: Cell<u64>,
}

impl DiskSpace {
    /// Starts optimistic (u64::MAX free) until the first successful refresh, so a failing
    /// `statvfs` never blocks produce by itself.
    pub fn new(dir: PathBuf, reserve_bytes: u64) -> DiskSpace {
        let space = DiskSpace { dir, reserve_bytes, free_bytes: Cell::new(u64::MAX) };
        space.refresh();
        space
    }

    /// Re-reads free space; on failure keeps the previous value and logs why.
    pub fn refresh(&self) {
        match free_bytes(&self.dir) {
            Ok(free) => self.free_bytes.set(free),
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "statvfs failed; keeping the last free-space reading")
            }
        }
    }

    /// `Err((free, reserve))` while free space is below the reserve.
    pub fn check(&self) -> Result<(), (u64, u64)> {
        let free = self.free_bytes.get();
        if free < self.reserve_bytes {
            Err((free, self.reserve_bytes))
        } else {
            Ok(())
        }
    }

    pub fn free_bytes(&self) -> u64 {
        self.free_bytes.get()
    }

    pub fn reserve_bytes(&self) -> u64 {
        self.reserve_bytes
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Bytes available to unprivileged users on the filesystem holding `dir` (or its nearest existing
/// ancestor, so a data directory not created yet still reports its filesystem).
fn free_bytes(dir: &Path) -> io::Result<u64> {
    let existing = dir.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    let c_path = CString::new(existing.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is a valid NUL-terminated string and stat a properly sized out-parameter.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_real_free_space_and_applies_reserve() {
        let dir = tempfile::tempdir().unwrap();
        let space = DiskSpace::new(dir.path().to_path_buf(), 0);
        assert!(space.free_bytes() > 0 && space.free_bytes() < u64::MAX);
        assert!(space.check().is_ok());
        let full = DiskSpace::new(dir.path().to_path_buf(), u64::MAX - 1);
        assert!(full.check().is_err());
    }
}
