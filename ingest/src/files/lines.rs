//! The line reader of [`super`]: lines in pieces, never more than the
//! limit held (see [`crate::limits`]).

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Take};
use std::path::Path;

use crate::embedded::Input;
use crate::limits::{InputKind, Oversized, TOO_LARGE_KEPT};

/// A non-empty line of an input file.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Line {
    /// The line within the limit, without its line end.
    Whole(Vec<u8>),
    /// A line over the limit: its first bytes and its full length; the
    /// rest was skipped, never held.
    Oversized { head: Vec<u8>, len: u64 },
}

impl Line {
    pub(super) fn into_input(
        self,
        kind: InputKind,
        limit: usize,
        whole: impl FnOnce(Vec<u8>) -> Input,
    ) -> Input {
        match self {
            Line::Whole(bytes) => whole(bytes),
            Line::Oversized { head, len } => Input::Oversized(Oversized {
                kind,
                head,
                len,
                limit: limit as u64,
            }),
        }
    }
}

/// Reads the non-empty lines of a JSON-lines file (from any `BufRead`): a
/// line over `limit` bytes (without its line end) is never held whole,
/// only its first [`TOO_LARGE_KEPT`] bytes while the rest is read in pieces
/// of [`SKIP_PIECE`] and dropped, to the next newline.
pub(super) struct Lines<R> {
    reader: R,
    limit: usize,
}

/// The lines of bytes `from..to` of the file at `path`.
pub(super) fn lines(
    path: &Path,
    from: u64,
    to: u64,
    limit: usize,
) -> std::io::Result<Lines<BufReader<Take<File>>>> {
    let mut file = File::open(path)?;
    file.seek(SeekFrom::Start(from))?;
    Ok(Lines {
        reader: BufReader::with_capacity(1 << 20, file.take(to.saturating_sub(from))),
        limit,
    })
}

/// The rest of a line over the limit is skipped in pieces of this size.
const SKIP_PIECE: u64 = 64 * 1024;

impl<R: BufRead> Lines<R> {
    /// The next line and whether it is blank; `None` at the end.
    fn next_line(&mut self) -> std::io::Result<Option<(Line, bool)>> {
        let mut kept = Vec::new();
        // At most the limit, a carriage return and the newline.
        let cap = self.limit as u64 + 2;
        let n = (&mut self.reader).take(cap).read_until(b'\n', &mut kept)?;
        if n == 0 {
            return Ok(None);
        }
        // Bytes read, the line end included; the last two of them.
        let mut read = n as u64;
        let mut last = kept.last().copied();
        let mut before_last = n.checked_sub(2).map(|i| kept[i]);
        let mut blank = kept.iter().all(u8::is_ascii_whitespace);
        let mut ended = last == Some(b'\n');
        if !ended && read == cap {
            // Over the limit: the rest is read in pieces, counted, dropped
            // (but for the head's first bytes).
            kept.truncate(TOO_LARGE_KEPT);
            let mut piece = Vec::new();
            while !ended {
                piece.clear();
                let m = (&mut self.reader)
                    .take(SKIP_PIECE)
                    .read_until(b'\n', &mut piece)?;
                if m == 0 {
                    break;
                }
                read += m as u64;
                // The head is the first bytes whatever the limit (below 4 KiB).
                let room = TOO_LARGE_KEPT.saturating_sub(kept.len()).min(m);
                kept.extend_from_slice(&piece[..room]);
                blank = blank && piece.iter().all(u8::is_ascii_whitespace);
                before_last = if m >= 2 { Some(piece[m - 2]) } else { last };
                last = piece.last().copied();
                ended = last == Some(b'\n');
            }
        }
        // The line's length without its line end ("\n", "\r\n", or a
        // "\r" before the end of the file, as the reader always took).
        let mut len = read;
        let mut content_last = last;
        if ended {
            len -= 1;
            content_last = before_last;
            if kept.last() == Some(&b'\n') {
                kept.pop();
            }
        }
        if content_last == Some(b'\r') {
            len -= 1;
            if kept.len() as u64 == len + 1 {
                kept.pop();
            }
        }
        let line = if len > self.limit as u64 {
            kept.truncate(TOO_LARGE_KEPT);
            Line::Oversized { head: kept, len }
        } else {
            Line::Whole(kept)
        };
        Ok(Some((line, blank)))
    }
}

impl<R: BufRead> Iterator for Lines<R> {
    type Item = std::io::Result<Line>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            match self.next_line() {
                Ok(Some((_, true))) => continue,
                Ok(Some((line, false))) => return Some(Ok(line)),
                Ok(None) => return None,
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `len` bytes of `x` made as they are read, then `rest`: a line of
    /// gigabytes that takes no memory.
    struct Generated {
        len: u64,
        at: u64,
        rest: std::io::Cursor<Vec<u8>>,
    }

    impl Read for Generated {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.at < self.len {
                let n = buf.len().min((self.len - self.at) as usize);
                buf[..n].fill(b'x');
                self.at += n as u64;
                return Ok(n);
            }
            self.rest.read(buf)
        }
    }

    /// A line over 2 GiB (what panicked the history encoder) is read in
    /// pieces of the buffer's size: what is held of it never grows past
    /// the limit, and the line after it is read.
    #[test]
    fn a_line_of_gigabytes_is_skipped_in_pieces() {
        let limit = 64 * 1024;
        let len = (2u64 << 30) + 7;
        let reader = Generated {
            len,
            at: 0,
            rest: std::io::Cursor::new(b"\r\n{\"next\":1}\n".to_vec()),
        };
        let mut lines = Lines {
            reader: BufReader::with_capacity(1 << 20, reader),
            limit,
        };
        match lines.next().unwrap().unwrap() {
            Line::Oversized { head, len: got } => {
                assert_eq!(got, len);
                assert_eq!(head, vec![b'x'; TOO_LARGE_KEPT]);
                assert!(head.capacity() <= 2 * (limit + 1), "{}", head.capacity());
            }
            Line::Whole(l) => panic!("a whole line of {} bytes", l.len()),
        }
        assert_eq!(
            lines.next().unwrap().unwrap(),
            Line::Whole(b"{\"next\":1}".to_vec())
        );
        assert!(lines.next().is_none());
    }

    /// The limit counts a line without its line end; blank lines are
    /// skipped, however long.
    #[test]
    fn lines_at_the_limit_are_whole_and_one_byte_more_is_not() {
        let at = "a".repeat(10);
        let over = "b".repeat(11);
        let blank = " ".repeat(50);
        let text = format!("{at}\r\n\n{over}\n{blank}\n{at}\n{over}\r\nend");
        let lines: Vec<Line> = Lines {
            reader: BufReader::with_capacity(4, text.as_bytes()),
            limit: 10,
        }
        .collect::<std::io::Result<_>>()
        .unwrap();
        assert_eq!(
            lines,
            [
                Line::Whole(at.clone().into_bytes()),
                Line::Oversized {
                    head: over.clone().into_bytes(),
                    len: 11
                },
                Line::Whole(at.into_bytes()),
                Line::Oversized {
                    head: over.into_bytes(),
                    len: 11
                },
                Line::Whole(b"end".to_vec()),
            ]
        );
    }
}
