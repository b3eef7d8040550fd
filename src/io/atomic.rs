//! Atomic file writes: a temporary beside each target, renamed over it on success, removed on failure.

use anyhow::{anyhow, bail, Result};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename, so a
/// reader never sees a partial file and a killed writer leaves the old file intact. A failed
/// write removes its temporary; temporaries that killed writers left for `path` are removed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| Ok(w.write_all(bytes)?))
}

/// [`write_atomic`] of whatever `write` produces (streamed through a buffered writer).
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> Result<()>,
) -> Result<()> {
    let mut staged = StagedFiles::default();
    staged.write(path, write)?;
    staged.commit()
}

/// Files written to temporaries beside their targets and renamed onto them together by
/// [`StagedFiles::commit`]: all of them or none. Dropped uncommitted (an error, a panic), it
/// removes its temporaries, so a failure leaves neither a partial file nor a temporary.
#[derive(Default)]
pub struct StagedFiles {
    /// (temporary, target) in the order written.
    staged: Vec<(PathBuf, PathBuf)>,
}

impl StagedFiles {
    /// Writes the temporary of `target` (`.NAME.tmpPID` in its folder) through `write`.
    /// Errors name `target`.
    pub fn write(
        &mut self,
        target: &Path,
        write: impl FnOnce(&mut dyn Write) -> Result<()>,
    ) -> Result<()> {
        let name = target
            .file_name()
            .ok_or_else(|| anyhow!("{} is not a file path", target.display()))?
            .to_string_lossy()
            .into_owned();
        if self.staged.iter().any(|(_, t)| t == target) {
            bail!("{} is written twice in one set of files", target.display());
        }
        let dir = folder_of(target);
        remove_stale_temporaries(dir, &name);
        let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
        // Recorded before it exists, so that whatever fails below removes it.
        self.staged.push((tmp.clone(), target.to_path_buf()));
        let failed = |e: anyhow::Error| anyhow!("cannot write {}: {e:#}", target.display());
        let file = File::create(&tmp).map_err(|e| failed(e.into()))?;
        let mut w = BufWriter::new(file);
        write(&mut w).map_err(failed)?;
        w.flush().map_err(|e| failed(e.into()))
    }

    /// Renames every temporary onto its target. A target that is a folder is refused before
    /// anything is renamed; should a rename still fail, the targets already replaced are
    /// removed (so no part of the set is left) and the remaining temporaries with them.
    pub fn commit(mut self) -> Result<()> {
        for (_, target) in &self.staged {
            if std::fs::symlink_metadata(target).is_ok_and(|m| m.is_dir()) {
                bail!(
                    "cannot write {}: a folder of that name is in the way",
                    target.display()
                );
            }
        }
        for i in 0..self.staged.len() {
            let (tmp, target) = &self.staged[i];
            if let Err(e) = std::fs::rename(tmp, target) {
                let msg = format!("cannot write {}: {e}", target.display());
                for (_, done) in self.staged.drain(..i) {
                    let _ = std::fs::remove_file(done);
                }
                bail!(msg);
            }
        }
        self.staged.clear();
        Ok(())
    }
}

impl Drop for StagedFiles {
    fn drop(&mut self) {
        for (tmp, _) in self.staged.drain(..) {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// The folder a path names a file in (`.` for a bare file name).
fn folder_of(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Whether `name` is a temporary that this module writes (`.TARGET.tmpPID`) and whose writer
/// is no longer running.
pub fn is_stale_temporary(name: &str) -> bool {
    let Some((_, pid)) = name.strip_prefix('.').and_then(|n| n.rsplit_once(".tmp")) else {
        return false;
    };
    pid.parse::<u32>()
        .is_ok_and(|pid| pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists())
}

/// Removes the `.NAME.tmpPID` files in `dir` whose writer process is no longer running.
fn remove_stale_temporaries(dir: &Path, name: &str) {
    let prefix = format!(".{name}.tmp");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some(file) = file.to_str() else {
            continue;
        };
        if file.strip_prefix(&prefix).is_some() && is_stale_temporary(file) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}
