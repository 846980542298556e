//! Where the history lives: a local directory (the default) or an
//! S3-compatible object store.
//!
//! The history writer and its compactor need four operations on files
//! named by relative paths (`table/date=2026-11-01/part-….parquet`): put a
//! whole file atomically, list, read, delete. [`HistoryFiles`] gives them
//! over both kinds of location:
//!
//! - **Local**: a put writes a hidden temporary file, fsyncs it, renames it
//!   and fsyncs the directory, so readers never see half a file and a
//!   renamed file survives a power cut.
//! - **Object store**: a put is one `PUT` of the whole object, which S3
//!   makes visible atomically; there is no rename and nothing to fsync.
//!   The writer runs on plain threads, so each [`HistoryFiles`] owns a
//!   small current-thread Tokio runtime to drive the `object_store` calls.
//!
//! An object store location is a URL, `s3://bucket/prefix`; credentials,
//! region and endpoint come from the standard `AWS_*` environment variables
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`,
//! `AWS_ENDPOINT`, `AWS_ALLOW_HTTP=true` for a local test server), as the
//! AWS tools read them.

use std::fmt;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use url::Url;

/// Errors of a history location.
#[derive(Debug, thiserror::Error)]
pub enum LocationError {
    /// A local file or directory operation failed.
    #[error("history {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// An object store operation failed.
    #[error("history {url}: {source}")]
    Store {
        /// The object's URL.
        url: String,
        /// The cause.
        source: object_store::Error,
    },
    /// The location is not a path or a supported URL.
    #[error("history location {0:?}: {1}")]
    BadLocation(String, String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LocationError + '_ {
    move |source| LocationError::Io {
        path: path.to_owned(),
        source,
    }
}

/// An S3-compatible bucket and prefix holding a history.
#[derive(Clone)]
pub struct RemoteLocation {
    /// `s3://bucket/prefix`, without a trailing slash.
    url: Url,
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
}

impl fmt::Debug for RemoteLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteLocation")
            .field("url", &self.url.as_str())
            .finish_non_exhaustive()
    }
}

impl RemoteLocation {
    /// The bucket's URL (`s3://bucket`), under which DataFusion finds the
    /// store.
    pub fn bucket_url(&self) -> Url {
        let mut url = self.url.clone();
        url.set_path("");
        url
    }

    /// The store.
    pub fn store(&self) -> Arc<dyn ObjectStore> {
        Arc::clone(&self.store)
    }

    /// The object path of `rel` (a table, a file) under this location's
    /// prefix.
    pub fn object(&self, rel: &str) -> ObjectPath {
        if self.prefix.as_ref().is_empty() {
            ObjectPath::from(rel)
        } else {
            ObjectPath::from(format!("{}/{rel}", self.prefix))
        }
    }
}

/// Where a history lives.
#[derive(Debug, Clone)]
pub enum HistoryLocation {
    /// A local directory.
    Local(PathBuf),
    /// A prefix in an S3-compatible bucket.
    Remote(RemoteLocation),
}

impl fmt::Display for HistoryLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HistoryLocation::Local(path) => write!(f, "{}", path.display()),
            HistoryLocation::Remote(remote) => write!(f, "{}", remote.url),
        }
    }
}

impl HistoryLocation {
    /// A local path, or an `s3://bucket/prefix` URL (credentials and
    /// endpoint from the `AWS_*` environment variables).
    pub fn parse(text: &str) -> Result<HistoryLocation, LocationError> {
        let bad = |why: &str| LocationError::BadLocation(text.to_owned(), why.to_owned());
        if !text.contains("://") {
            return Ok(HistoryLocation::Local(PathBuf::from(text)));
        }
        let url = Url::parse(text).map_err(|e| bad(&e.to_string()))?;
        match url.scheme() {
            "file" => url
                .to_file_path()
                .map(HistoryLocation::Local)
                .map_err(|()| bad("not a local file path")),
            "s3" | "s3a" => {
                if url.host_str().is_none_or(str::is_empty) {
                    return Err(bad("an s3 URL needs a bucket: s3://bucket/prefix"));
                }
                let store = AmazonS3Builder::from_env()
                    .with_url(text)
                    .build()
                    .map_err(|e| bad(&e.to_string()))?;
                let prefix = ObjectPath::from(url.path().trim_matches('/'));
                let mut url = url;
                let path = url.path().trim_end_matches('/').to_owned();
                url.set_path(&path);
                Ok(HistoryLocation::Remote(RemoteLocation {
                    url,
                    store: Arc::new(store),
                    prefix,
                }))
            }
            other => Err(bad(&format!(
                "unsupported scheme {other:?} (a local path, file:// or s3://)"
            ))),
        }
    }

    /// The URL (with a trailing slash) of a table's directory, as
    /// DataFusion's listing tables take it.
    pub fn table_url(&self, table: &str) -> Result<String, LocationError> {
        match self {
            HistoryLocation::Local(root) => {
                let dir = root.join(table);
                let dir = std::path::absolute(&dir).map_err(io_err(&dir))?;
                Ok(format!("{}/", dir.display()))
            }
            HistoryLocation::Remote(remote) => Ok(format!("{}/{table}/", remote.url)),
        }
    }
}

/// One stored file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredFile {
    /// Path relative to the history root: `table/col=value/name`.
    pub rel: String,
    /// Size in bytes.
    pub size: u64,
}

impl StoredFile {
    /// The file name (last path segment).
    pub fn name(&self) -> &str {
        self.rel.rsplit('/').next().unwrap_or(&self.rel)
    }

    /// The partition directory (`table/col=value`).
    pub fn dir(&self) -> &str {
        self.rel.rsplit_once('/').map_or("", |(dir, _)| dir)
    }
}

/// Blocking file operations on a history location (see the module docs).
pub struct HistoryFiles {
    location: HistoryLocation,
    /// Drives the object store; `None` for a local directory.
    runtime: Option<tokio::runtime::Runtime>,
}

impl fmt::Debug for HistoryFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HistoryFiles({})", self.location)
    }
}

impl HistoryFiles {
    /// File operations on `location`. Must not be called from inside a
    /// Tokio runtime (it blocks on its own).
    pub fn new(location: HistoryLocation) -> Result<HistoryFiles, LocationError> {
        let runtime = match &location {
            HistoryLocation::Local(_) => None,
            HistoryLocation::Remote(_) => Some(
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(io_err(Path::new("tokio runtime")))?,
            ),
        };
        Ok(HistoryFiles { location, runtime })
    }

    /// The location.
    pub fn location(&self) -> &HistoryLocation {
        &self.location
    }

    fn remote(&self) -> Option<(&RemoteLocation, &tokio::runtime::Runtime)> {
        match (&self.location, &self.runtime) {
            (HistoryLocation::Remote(remote), Some(rt)) => Some((remote, rt)),
            _ => None,
        }
    }

    fn local_path(&self, rel: &str) -> PathBuf {
        match &self.location {
            HistoryLocation::Local(root) => root.join(rel),
            HistoryLocation::Remote(_) => PathBuf::from(rel),
        }
    }

    fn store_err(&self, rel: &str) -> impl FnOnce(object_store::Error) -> LocationError + '_ {
        let url = format!("{}/{rel}", self.location);
        move |source| LocationError::Store { url, source }
    }

    /// Writes a whole file atomically: readers see all of it or none.
    pub fn put(&self, rel: &str, bytes: Vec<u8>) -> Result<(), LocationError> {
        if let Some((remote, rt)) = self.remote() {
            let object = remote.object(rel);
            rt.block_on(remote.store.put(&object, PutPayload::from(bytes)))
                .map_err(self.store_err(rel))?;
            return Ok(());
        }
        let path = self.local_path(rel);
        let dir = path.parent().unwrap_or(Path::new(".")).to_owned();
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
        let tmp = dir.join(format!(".{name}.tmp"));
        let mut file = File::create(&tmp).map_err(io_err(&tmp))?;
        io::Write::write_all(&mut file, &bytes).map_err(io_err(&tmp))?;
        file.sync_all().map_err(io_err(&tmp))?;
        drop(file);
        std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&dir))
    }

    /// Every file under the root (temporary ones too), sorted by path.
    pub fn list(&self) -> Result<Vec<StoredFile>, LocationError> {
        self.list_dir("")
    }

    /// Every file under the directory `rel_dir` (`""`: the root), sorted
    /// by path; paths stay relative to the root.
    pub fn list_dir(&self, rel_dir: &str) -> Result<Vec<StoredFile>, LocationError> {
        let mut out = Vec::new();
        if let Some((remote, rt)) = self.remote() {
            let prefix = if rel_dir.is_empty() {
                remote.prefix.clone()
            } else {
                remote.object(rel_dir)
            };
            let prefix = (!prefix.as_ref().is_empty()).then_some(&prefix);
            let metas: Vec<_> = rt
                .block_on(remote.store.list(prefix).try_collect())
                .map_err(self.store_err(rel_dir))?;
            let skip = if remote.prefix.as_ref().is_empty() {
                0
            } else {
                remote.prefix.as_ref().len() + 1
            };
            for meta in metas {
                let full = meta.location.as_ref();
                if let Some(rel) = full.get(skip..) {
                    out.push(StoredFile {
                        rel: rel.to_owned(),
                        size: meta.size,
                    });
                }
            }
        } else {
            let dir = self.local_path(rel_dir);
            if dir.exists() {
                walk(&dir, rel_dir, &mut out)?;
            }
        }
        out.sort_by(|a, b| a.rel.cmp(&b.rel));
        Ok(out)
    }

    /// A whole file.
    pub fn get(&self, rel: &str) -> Result<Vec<u8>, LocationError> {
        if let Some((remote, rt)) = self.remote() {
            let object = remote.object(rel);
            let bytes = rt
                .block_on(async { remote.store.get(&object).await?.bytes().await })
                .map_err(self.store_err(rel))?;
            return Ok(bytes.to_vec());
        }
        let path = self.local_path(rel);
        std::fs::read(&path).map_err(io_err(&path))
    }

    /// Deletes a file (a missing one is not an error).
    pub fn delete(&self, rel: &str) -> Result<(), LocationError> {
        if let Some((remote, rt)) = self.remote() {
            let object = remote.object(rel);
            return match rt.block_on(remote.store.delete(&object)) {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(self.store_err(rel)(e)),
            };
        }
        let path = self.local_path(rel);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Deletes everything under the root.
    pub fn clear(&self) -> Result<(), LocationError> {
        if self.remote().is_some() {
            for file in self.list()? {
                self.delete(&file.rel)?;
            }
            return Ok(());
        }
        let root = self.local_path("");
        match std::fs::remove_dir_all(&root) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&root)(e)),
        }
    }
}

/// Lists the files under `dir` (relative names joined with `/`).
fn walk(dir: &Path, rel: &str, out: &mut Vec<StoredFile>) -> Result<(), LocationError> {
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let child = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        let meta = entry.metadata().map_err(io_err(&entry.path()))?;
        if meta.is_dir() {
            walk(&entry.path(), &child, out)?;
        } else {
            out.push(StoredFile {
                rel: child,
                size: meta.len(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_paths_and_urls() {
        assert!(matches!(
            HistoryLocation::parse("out/history").unwrap(),
            HistoryLocation::Local(p) if p == Path::new("out/history")
        ));
        assert!(matches!(
            HistoryLocation::parse("file:///tmp/h").unwrap(),
            HistoryLocation::Local(p) if p == Path::new("/tmp/h")
        ));
        let remote = HistoryLocation::parse("s3://bucket/some/prefix/").unwrap();
        assert_eq!(remote.to_string(), "s3://bucket/some/prefix");
        assert_eq!(
            remote.table_url("cards").unwrap(),
            "s3://bucket/some/prefix/cards/"
        );
        let HistoryLocation::Remote(r) = remote else {
            panic!("remote")
        };
        assert_eq!(r.bucket_url().as_str(), "s3://bucket");
        assert_eq!(r.object("t/x").as_ref(), "some/prefix/t/x");
        for bad in ["gs://b/p", "s3:///nobucket", "http://[::1"] {
            assert!(
                matches!(
                    HistoryLocation::parse(bad),
                    Err(LocationError::BadLocation(..))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn local_files_put_list_get_delete() {
        let dir = tempfile::tempdir().unwrap();
        let files = HistoryFiles::new(HistoryLocation::Local(dir.path().join("h"))).unwrap();
        assert!(files.list().unwrap().is_empty());
        files
            .put("t/date=2026-01-01/a.parquet", b"abc".to_vec())
            .unwrap();
        files
            .put("t/date=2026-01-02/b.parquet", b"de".to_vec())
            .unwrap();
        let listed = files.list().unwrap();
        assert_eq!(
            listed,
            vec![
                StoredFile {
                    rel: "t/date=2026-01-01/a.parquet".into(),
                    size: 3
                },
                StoredFile {
                    rel: "t/date=2026-01-02/b.parquet".into(),
                    size: 2
                },
            ]
        );
        assert_eq!(listed[0].name(), "a.parquet");
        assert_eq!(listed[0].dir(), "t/date=2026-01-01");
        assert_eq!(files.get("t/date=2026-01-02/b.parquet").unwrap(), b"de");
        files.delete("t/date=2026-01-01/a.parquet").unwrap();
        files.delete("t/date=2026-01-01/a.parquet").unwrap();
        assert_eq!(files.list().unwrap().len(), 1);
        files.clear().unwrap();
        assert!(files.list().unwrap().is_empty());
    }
}
