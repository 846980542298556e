//! Recovery after a crash: which history files a restored snapshot
//! keeps. Files are named by their window (`part-<from>-<chunk>`, or
//! `part-<from>-m<last>` once merged); the windows after the snapshot's,
//! temporary files, superseded dumps and the inputs of a merge cut short
//! are deleted (see the module docs of `history` for why that is exact).

use super::*;

/// The window start (`from`) a history file name carries, if it is one.
pub(super) fn window_of(name: &str) -> Option<u64> {
    let rest = name.strip_prefix("part-")?;
    rest.get(..20)?.parse().ok()
}

/// The windows a history file covers: `part-<from>-<chunk>` covers window
/// `from`; a merged `part-<from>-m<last>` windows `from` through `last`.
pub(super) fn file_range(name: &str) -> Option<(u64, u64)> {
    let from = window_of(name)?;
    let last = name
        .strip_prefix("part-")
        .and_then(|rest| rest.get(21..))
        .and_then(|rest| rest.strip_prefix('m'))
        .and_then(|rest| rest.get(..20))
        .and_then(|digits| digits.parse().ok());
    Some((from, last.unwrap_or(from)))
}

/// A snapshot dump (`cards`, `pool_cycle_usage`): replaced, never merged.
pub(super) fn is_dump(name: &str) -> bool {
    name.contains("-cards") || name.contains("-pools")
}

/// Deletes every file of windows after `after`, every temporary file,
/// every superseded `cards` / `pool_cycle_usage` dump, and every file
/// whose windows lie inside a merged file's (a merge cut short). Returns
/// the partition directories left with more than one file (worth a look
/// by the compactor).
pub(super) fn recover(files: &HistoryFiles, after: u64) -> Result<BTreeSet<String>, HistoryError> {
    let mut by_dir: HashMap<String, Vec<StoredFile>> = HashMap::new();
    for file in files.list()? {
        by_dir.entry(file.dir().to_owned()).or_default().push(file);
    }
    let mut crowded = BTreeSet::new();
    for (dir, listed) in by_dir {
        let mut kept = Vec::new();
        for file in listed {
            let name = file.name();
            let stale = match file_range(name) {
                _ if name.starts_with('.') => true,
                Some((from, _)) if from > after => true,
                Some((_, last)) if last > after => {
                    return Err(HistoryError::MergedPastSnapshot(file.rel, after));
                }
                _ => false,
            };
            if stale {
                files.delete(&file.rel)?;
            } else {
                kept.push(file);
            }
        }
        let merged: Vec<(u64, u64, String)> = kept
            .iter()
            .filter_map(|f| {
                let (from, last) = file_range(f.name())?;
                (last > from || f.name().contains("-m")).then(|| (from, last, f.rel.clone()))
            })
            .collect();
        let mut survivors = Vec::new();
        for file in kept {
            let inside = file_range(file.name()).is_some_and(|(from, last)| {
                merged
                    .iter()
                    .any(|(a, b, rel)| *rel != file.rel && *a <= from && last <= *b)
            });
            if inside {
                files.delete(&file.rel)?;
            } else {
                survivors.push(file);
            }
        }
        if let Some(newest) = survivors
            .iter()
            .map(StoredFile::name)
            .filter(|n| is_dump(n))
            .max()
            .map(str::to_owned)
        {
            remove_older_than(files, &survivors, &newest)?;
        }
        if survivors.len() > 1 {
            crowded.insert(dir);
        }
    }
    Ok(crowded)
}

/// Removes the snapshot dumps (`-cards`, `-pools`) among `listed` older
/// than the one whose name starts like `newest` (same window prefix).
pub(super) fn remove_older_than(
    files: &HistoryFiles,
    listed: &[StoredFile],
    newest: &str,
) -> Result<(), HistoryError> {
    let Some(keep) = window_of(newest) else {
        return Ok(());
    };
    for file in listed {
        let name = file.name();
        if is_dump(name) && window_of(name).is_some_and(|w| w < keep) {
            files.delete(&file.rel)?;
        }
    }
    Ok(())
}
