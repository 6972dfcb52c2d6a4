//! Opening the log: reading every segment into a fresh index (with the recovery rule
//! of `segment`), `dolores check` and `repair`, and the move of a store from before the
//! log into it.

use std::path::Path;
use std::sync::Arc;

use super::super::embedded::{self, RedbStorage};
use super::super::local::Bounds;
use super::super::segment::{self, FrameBuilder, SegmentWriter};
use super::super::{EngineError, Message, Result};
use super::index::{LogState, Segment};

/// Messages per frame when a store from before the log is migrated into it.
const MIGRATION_FRAME_MESSAGES: usize = 10_000;

/// Where the damage that stops a log from opening is.
#[derive(Debug)]
pub(super) struct Damaged {
    seq: u64,
    at: u64,
    pub(super) error: EngineError,
}

fn corrupt_segment(data_dir: &Path, path: &Path, what: &str) -> EngineError {
    EngineError::Corrupt(format!(
        "the log segment {} is damaged ({what}): {}",
        path.display(),
        segment::repair_hint(data_dir)
    ))
}

/// Reads every segment of `log_dir` into a fresh state. With `cut_torn_tail`, a torn
/// last frame is cut off the file; without, the files are only read (`dolores check`).
pub(super) fn load(
    data_dir: &Path,
    log_dir: &Path,
    cut_torn_tail: bool,
) -> std::result::Result<(LogState, u64, segment::ScanEnd), Damaged> {
    let engine = |error| Damaged {
        seq: 0,
        at: 0,
        error,
    };
    let seqs = segment::list(log_dir).map_err(engine)?;
    let mut state = LogState::default();
    let mut last = (
        0,
        segment::ScanEnd {
            valid_end: 0,
            torn: false,
        },
    );
    for (i, &seq) in seqs.iter().enumerate() {
        let (file, path) = segment::open_file(log_dir, seq, false).map_err(engine)?;
        let bytes = std::fs::read(&path)
            .map_err(|e| engine(segment::io_error("cannot read", &path, &e)))?;
        let is_last = i + 1 == seqs.len();
        // Registered before its frames are read, so they can say where they are.
        state.segments.insert(
            seq,
            Segment {
                file: Arc::new(file),
                last_pos: 0,
            },
        );
        let end = segment::scan(&bytes, |_, entries| state.load_frame(seq, entries)).map_err(
            |damage| Damaged {
                seq,
                at: damage.at,
                error: corrupt_segment(data_dir, &path, &damage.what),
            },
        )?;
        if end.torn && !is_last {
            return Err(Damaged {
                seq,
                at: end.valid_end,
                error: corrupt_segment(
                    data_dir,
                    &path,
                    &format!("the frame at byte {} is damaged", end.valid_end),
                ),
            });
        }
        if end.torn && cut_torn_tail {
            tracing::warn!(
                "{}: cut a torn frame at byte {} (written when the server stopped, never acknowledged)",
                path.display(),
                end.valid_end
            );
            let cut = state.segments.get(&seq).map(|s| {
                s.file
                    .set_len(end.valid_end)
                    .and_then(|()| s.file.sync_all())
            });
            if let Some(Err(e)) = cut {
                return Err(engine(segment::io_error("cannot cut", &path, &e)));
            }
        }
        last = (seq, end);
    }
    // Every kept position must be there: from just after trimmed_through to the head.
    let bounds = state.bounds;
    let kept_from = if state.entries.is_empty() {
        bounds.head + 1
    } else {
        state.base
    };
    if kept_from != bounds.trimmed_through + 1 {
        let path = log_dir.join(segment::file_name(seqs.first().copied().unwrap_or(0)));
        return Err(engine(corrupt_segment(
            data_dir,
            &path,
            &format!(
                "messages {} to {} are missing",
                bounds.trimmed_through + 1,
                kept_from.saturating_sub(1)
            ),
        )));
    }
    Ok((state, last.0, last.1))
}

/// Checks the store in `dir` (see `engine::check_embedded`): redb's file as before,
/// then the log, read without changing it. A torn last frame is what a crash leaves
/// and is sound (the next start cuts it). With `repair`, a damaged log is cut at the
/// damage: the damaged frame and everything after it are dropped.
pub(crate) fn check(dir: &Path, repair: bool) -> Result<bool> {
    let redb_sound = embedded::check(dir, repair)?;
    let log_dir = dir.join(segment::DIR_NAME);
    if !log_dir.is_dir() {
        // A store from before the log: its messages are in redb, moved at next start.
        return Ok(redb_sound);
    }
    match load(dir, &log_dir, false) {
        Ok(_) => Ok(redb_sound),
        Err(damaged) if !repair || damaged.seq == 0 => Err(damaged.error),
        Err(damaged) => {
            cut_log(&log_dir, damaged.seq, damaged.at)?;
            load(dir, &log_dir, true).map_err(|d| d.error)?;
            Ok(false)
        }
    }
}

/// Cuts the log at byte `at` of segment `seq`: that segment is truncated there, every
/// later one deleted.
fn cut_log(log_dir: &Path, seq: u64, at: u64) -> Result<()> {
    let (file, path) = segment::open_file(log_dir, seq, false)?;
    file.set_len(at)
        .and_then(|()| file.sync_all())
        .map_err(|e| segment::io_error("cannot cut", &path, &e))?;
    for later in segment::list(log_dir)?.into_iter().filter(|&s| s > seq) {
        let path = log_dir.join(segment::file_name(later));
        std::fs::remove_file(&path).map_err(|e| segment::io_error("cannot delete", &path, &e))?;
    }
    segment::sync_dir(log_dir)
}

/// Starts the log in `log_dir` (which has no segment): empty, or with what a store
/// from before the log kept in redb. See the module doc.
pub(super) fn migrate(redb: &RedbStorage, log_dir: &Path, segment_bytes: u64) -> Result<()> {
    let (file, _) = segment::open_file(log_dir, 1, true)?;
    segment::sync_dir(log_dir)?;
    let Some(old) = redb.old_log()? else {
        return Ok(());
    };
    tracing::info!(
        "moving {} message(s) from {} into the log in {}",
        old.messages.len(),
        embedded::FILE_NAME,
        log_dir.display()
    );
    let mut writer = SegmentWriter::new(log_dir, 1, Arc::new(file), 0, segment_bytes)?;
    let mut head = old
        .messages
        .first()
        .map_or(old.bounds.head, |(pos, ..)| pos - 1);
    let chunks = old.messages.chunks(MIGRATION_FRAME_MESSAGES);
    let mut frames = Vec::new();
    for chunk in chunks {
        head += chunk.len() as u64;
        let mut frame = FrameBuilder::new(Bounds {
            head,
            trimmed_through: old.bounds.trimmed_through,
        });
        for (pos, time_ms, track, json) in chunk {
            let message = Message::new(*pos, track.as_str().into(), json.as_str().into(), *time_ms);
            frame.message(&message);
        }
        frames.push(frame);
    }
    // The bounds (and the keys) go in a last frame, so an empty log keeps its head.
    let mut last = FrameBuilder::new(old.bounds);
    for (key, record) in &old.keys {
        last.key(key, record);
    }
    frames.push(last);
    for frame in frames {
        writer.append(&frame.finish())?;
    }
    Ok(())
}
