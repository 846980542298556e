//! What is on disk, for tests that check that something changed nothing
//! (a refused start, a failed run): take the [`tree`] before and after
//! and compare.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Every file and directory under `dir` (relative paths) with the files'
/// bytes (directories: `None`). Panics if `dir` cannot be read: a test
/// helper.
pub fn tree(dir: &Path) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
    let mut found = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(dir).unwrap().to_owned();
            if path.is_dir() {
                found.insert(rel, None);
                stack.push(path);
            } else {
                found.insert(rel, Some(std::fs::read(&path).unwrap()));
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tree_holds_every_file_and_directory_and_sees_a_change() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/a"), b"1").unwrap();
        std::fs::write(dir.path().join("b"), b"2").unwrap();
        let before = tree(dir.path());
        assert_eq!(
            before,
            BTreeMap::from([
                (PathBuf::from("b"), Some(b"2".to_vec())),
                (PathBuf::from("sub"), None),
                (PathBuf::from("sub/a"), Some(b"1".to_vec())),
            ])
        );
        std::fs::write(dir.path().join("sub/a"), b"3").unwrap();
        assert_ne!(before, tree(dir.path()));
    }
}
