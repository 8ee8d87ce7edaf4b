//! Byte-range sources and atomic output. Readers only ever ask for ranges, so the same parsing code serves a
//! local file (positioned reads), an in-memory buffer, or (in the browser) bytes fetched by HTTP range requests.

use crate::error::{AvbError, Result};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

pub trait RangeSource {
    /// Total length in bytes.
    fn len(&self) -> u64;
    /// Fill `buf` with the bytes at `offset..offset + buf.len()`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Name used in error messages.
    fn name(&self) -> &Path;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn read_vec(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.read_at(offset, &mut buf)?;
        Ok(buf)
    }
}

pub struct FileSource {
    path: PathBuf,
    file: File,
    len: u64,
}

impl FileSource {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| AvbError::io(path, e))?;
        let len = file.metadata().map_err(|e| AvbError::io(path, e))?.len();
        Ok(Self {
            path: path.to_path_buf(),
            file,
            len,
        })
    }
}

impl RangeSource for FileSource {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|end| end > self.len) {
            return Err(AvbError::truncated(
                &self.path,
                format!(
                    "needed bytes {}..{} but the file has {} bytes",
                    offset,
                    offset + buf.len() as u64,
                    self.len
                ),
            ));
        }
        read_exact_at(&self.file, buf, offset).map_err(|e| AvbError::io(&self.path, e))
    }
    fn name(&self) -> &Path {
        &self.path
    }
}

#[cfg(unix)]
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(not(unix))]
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = file.try_clone()?;
    f.seek(SeekFrom::Start(offset))?;
    f.read_exact(buf)
}

/// A whole file or download held in memory, or only the first bytes of a longer one (a browser that fetched a
/// header by HTTP range): reads past what is held fail and name the missing bytes.
pub struct BytesSource {
    name: PathBuf,
    bytes: Vec<u8>,
    len: u64,
}

impl BytesSource {
    pub fn new(name: impl Into<PathBuf>, bytes: Vec<u8>) -> Self {
        let len = bytes.len() as u64;
        Self {
            name: name.into(),
            bytes,
            len,
        }
    }

    /// The first `prefix.len()` bytes of a file of `len` bytes.
    pub fn prefix(name: impl Into<PathBuf>, prefix: Vec<u8>, len: u64) -> Self {
        Self {
            name: name.into(),
            len: len.max(prefix.len() as u64),
            bytes: prefix,
        }
    }
}

impl RangeSource for BytesSource {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let start = usize::try_from(offset).ok();
        if let Some(src) = start.and_then(|s| self.bytes.get(s..s.checked_add(buf.len())?)) {
            buf.copy_from_slice(src);
            return Ok(());
        }
        let (held, end) = (self.bytes.len() as u64, offset + buf.len() as u64);
        if end <= self.len {
            return Err(AvbError::Invalid(format!(
                "{}: bytes {offset}..{end} are needed but only the first {held} of {} were fetched",
                self.name.display(),
                self.len
            )));
        }
        Err(AvbError::truncated(
            &self.name,
            format!(
                "needed bytes {offset}..{end} but only {} are present",
                self.len
            ),
        ))
    }
    fn name(&self) -> &Path {
        &self.name
    }
}

/// Build the directory `out` (which must not exist) by running `fill` on a staging directory next to it, then
/// renaming the staging directory into place: an error leaves neither `out` nor the staging directory behind.
pub fn build_dir_atomic<T>(out: &Path, fill: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    let out_name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "output".into());
    let staging = out.with_file_name(format!(".{out_name}.partial-{}", std::process::id()));
    std::fs::create_dir_all(&staging).map_err(|e| AvbError::io(&staging, e))?;
    let result = fill(&staging).and_then(|v| {
        std::fs::rename(&staging, out)
            .map_err(|e| AvbError::io(out, e))
            .map(|_| v)
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    result
}

/// Write `parts` to `path` through a temporary file in the same directory and an atomic rename, so a
/// crash or error never leaves a half-written output under the final name.
pub fn write_atomic(path: &Path, parts: &[&[u8]]) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(AvbError::Invalid(format!(
            "{}: output directory {} does not exist. Fix: create it first.",
            path.display(),
            dir.display()
        )));
    }
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{}.{}.tmp", file_name, std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        for p in parts {
            f.write_all(p)?;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(AvbError::io(path, e));
    }
    Ok(())
}
