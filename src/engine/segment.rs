//! The segment log's files: how a group commit is laid on disk, written, synced and
//! read back at open. `logstore` keeps the index and the rules; this module only knows
//! bytes.
//!
//! # Layout
//!
//! `DATA/log/00000000000000000001.seg`, `…2.seg`, …: segments in order, each grown to
//! about [`SEGMENT_BYTES`] before the next one starts. A segment is written only at its
//! end, and is zero-filled ahead of the writes ([`ZERO_CHUNK`] at a time, synced once),
//! so the `fdatasync` of a group commit flushes only the overwritten data pages, never
//! the file's size or extents.
//!
//! # Frames
//!
//! One group commit is one *frame*, written with one `write` and synced with one
//! `fdatasync`:
//!
//! ```text
//! u32 payload length (LE) | u32 CRC-32 of the payload (LE) | payload | zeros to 8 bytes
//! ```
//!
//! The payload is a list of entries, each a tag byte and its fields (integers
//! little-endian, strings as a u32 length and UTF-8 bytes). The first entry is always
//! `Bounds` (the log's head and trimmed-through position after this frame), so the
//! newest frame alone says where the log stands even when every older segment is gone.
//!
//! - `Bounds`: head u64, trimmed_through u64;
//! - `Message`: position u64, time_ms u64, track, json;
//! - `Key` (an `Idempotency-Key`): time_ms u64, first u64, count u64, key, digest;
//! - `ExpireKeys`: before_ms u64 (keys recorded before it are forgotten).
//!
//! # Recovery rule
//!
//! A frame is whole (its length fits the file and its CRC matches) or it is not. A
//! segment is read frame by frame until a zero header (the zero-filled space not used
//! yet) or a frame that is not whole. Then the rest of the segment is searched for a
//! whole frame: finding one means a frame that was synced (a later one was written
//! after its sync returned) is damaged — the store is corrupt, and the error says
//! which file and what to run. Finding none in the last segment means a torn tail: the
//! frame being written when the process or the machine died, which nobody was told was
//! stored; it is cut off. A frame that is not whole in an older segment is damage too.
//!
//! What this cannot tell apart: bit rot in the very last frame looks like a torn write
//! and is cut like one (no log can tell, without a second copy). What it cannot be
//! fooled by: a message's text holding bytes that read as a frame — a frame's payload
//! starts with the byte 0x01 (the `Bounds` tag), a control character that JSON text
//! never holds unescaped.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::EngineError;
use super::local::{Bounds, KeyRecord};
use super::{Message, Position, Result};

/// The folder of the segments inside the data dir.
pub(crate) const DIR_NAME: &str = "log";
/// A segment's size: big enough that rolling to a new file (a file create and a
/// directory sync) is rare, small enough that retention frees space in steps that
/// matter on a small disk and a scan at open reads one segment at a time.
pub(crate) const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// How much of a segment is zero-filled (and synced) at a time ahead of the writes: one
/// extra sync per MiB of log keeps the size and extent changes out of every group
/// commit's `fdatasync`.
pub(crate) const ZERO_CHUNK: u64 = 1024 * 1024;
/// A frame's header: payload length and CRC.
const HEADER: usize = 8;
/// Frames start at multiples of this, so a search for a whole frame after a damaged
/// one only looks at aligned offsets.
const ALIGN: usize = 8;

const TAG_BOUNDS: u8 = 1;
const TAG_MESSAGE: u8 = 2;
const TAG_KEY: u8 = 3;
const TAG_EXPIRE_KEYS: u8 = 4;

/// The file name of segment `seq`.
pub(crate) fn file_name(seq: u64) -> String {
    format!("{seq:020}.seg")
}

/// An I/O error as the engine's: a full disk is told apart, because it heals once
/// space is freed and the publisher should hear exactly that.
pub(crate) fn io_error(what: &str, path: &Path, e: &std::io::Error) -> EngineError {
    let text = format!("{what} {}: {e}", path.display());
    if e.kind() == ErrorKind::StorageFull || e.raw_os_error() == Some(28) {
        EngineError::Full(text)
    } else {
        EngineError::Storage(text)
    }
}

/// What to do about a damaged log, said with every error that names one.
pub(crate) fn repair_hint(data_dir: &Path) -> String {
    format!(
        "stop the server and run `dolores repair --data {}` (it cuts the log at the damage)",
        data_dir.display()
    )
}

/// Builds one frame: the entries of one group commit.
#[derive(Debug)]
pub(crate) struct FrameBuilder {
    bytes: Vec<u8>,
}

impl FrameBuilder {
    /// A frame that starts with the log's bounds after it.
    pub(crate) fn new(bounds: Bounds) -> Self {
        let mut bytes = Vec::with_capacity(256);
        bytes.extend_from_slice(&[0; HEADER]);
        bytes.push(TAG_BOUNDS);
        put_u64(&mut bytes, bounds.head);
        put_u64(&mut bytes, bounds.trimmed_through);
        Self { bytes }
    }

    /// Adds a message; returns where its JSON text starts, from the frame's start.
    pub(crate) fn message(&mut self, message: &Message) -> u64 {
        self.bytes.push(TAG_MESSAGE);
        put_u64(&mut self.bytes, message.pos);
        put_u64(&mut self.bytes, message.time_ms);
        put_str(&mut self.bytes, &message.track);
        put_u32(&mut self.bytes, message.json.len() as u32);
        let at = self.bytes.len() as u64;
        self.bytes.extend_from_slice(message.json.as_bytes());
        at
    }

    /// Adds an append recorded under an idempotency key.
    pub(crate) fn key(&mut self, key: &str, record: &KeyRecord) {
        self.bytes.push(TAG_KEY);
        put_u64(&mut self.bytes, record.time_ms);
        put_u64(&mut self.bytes, record.first);
        put_u64(&mut self.bytes, record.count);
        put_str(&mut self.bytes, key);
        put_str(&mut self.bytes, &record.digest);
    }

    /// Adds the expiry of the keys recorded before `before_ms`.
    pub(crate) fn expire_keys(&mut self, before_ms: u64) {
        self.bytes.push(TAG_EXPIRE_KEYS);
        put_u64(&mut self.bytes, before_ms);
    }

    /// The whole frame: header filled in, padded to [`ALIGN`].
    pub(crate) fn finish(mut self) -> Vec<u8> {
        let len = (self.bytes.len() - HEADER) as u32;
        let crc = crc32fast::hash(&self.bytes[HEADER..]);
        self.bytes[..4].copy_from_slice(&len.to_le_bytes());
        self.bytes[4..HEADER].copy_from_slice(&crc.to_le_bytes());
        let padded = self.bytes.len().next_multiple_of(ALIGN);
        self.bytes.resize(padded, 0);
        self.bytes
    }
}

fn put_u64(bytes: &mut Vec<u8>, v: u64) {
    bytes.extend_from_slice(&v.to_le_bytes());
}

fn put_u32(bytes: &mut Vec<u8>, v: u32) {
    bytes.extend_from_slice(&v.to_le_bytes());
}

fn put_str(bytes: &mut Vec<u8>, s: &str) {
    put_u32(bytes, s.len() as u32);
    bytes.extend_from_slice(s.as_bytes());
}

/// One entry of a frame read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Entry<'a> {
    /// The log's bounds after the frame.
    Bounds(Bounds),
    /// A message; `json_at` is where its text starts in the segment file.
    Message {
        pos: Position,
        time_ms: u64,
        track: &'a str,
        json: &'a str,
        json_at: u64,
    },
    /// An append recorded under an idempotency key.
    Key { key: &'a str, record: KeyRecord },
    /// Keys recorded before this time are forgotten.
    ExpireKeys { before_ms: u64 },
}

/// Reads a payload's entries in order, as they sit at `payload_at` in their file.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    payload_at: u64,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let taken = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(taken)
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn str(&mut self) -> Option<&'a str> {
        let len = self.u32()? as usize;
        std::str::from_utf8(self.take(len)?).ok()
    }

    fn entry(&mut self) -> Option<Entry<'a>> {
        let tag = *self.take(1)?.first()?;
        Some(match tag {
            TAG_BOUNDS => Entry::Bounds(Bounds {
                head: self.u64()?,
                trimmed_through: self.u64()?,
            }),
            TAG_MESSAGE => {
                let pos = self.u64()?;
                let time_ms = self.u64()?;
                let track = self.str()?;
                let len = self.u32()? as usize;
                let json_at = self.payload_at + self.at as u64;
                let json = std::str::from_utf8(self.take(len)?).ok()?;
                Entry::Message {
                    pos,
                    time_ms,
                    track,
                    json,
                    json_at,
                }
            }
            TAG_KEY => {
                let time_ms = self.u64()?;
                let first = self.u64()?;
                let count = self.u64()?;
                let key = self.str()?;
                let digest = self.str()?.to_owned();
                Entry::Key {
                    key,
                    record: KeyRecord {
                        time_ms,
                        digest,
                        first,
                        count,
                    },
                }
            }
            TAG_EXPIRE_KEYS => Entry::ExpireKeys {
                before_ms: self.u64()?,
            },
            _ => return None,
        })
    }
}

/// A frame's entries, or `None` when the payload does not read as entries (a frame
/// whose CRC matched but whose content does not: damage all the same).
fn entries(payload: &[u8], payload_at: u64) -> Option<Vec<Entry<'_>>> {
    let mut reader = Reader {
        bytes: payload,
        at: 0,
        payload_at,
    };
    let mut entries = Vec::new();
    while reader.at < payload.len() {
        entries.push(reader.entry()?);
    }
    matches!(entries.first(), Some(Entry::Bounds(_))).then_some(entries)
}

/// What is at an offset of a segment.
enum At<'a> {
    /// A whole frame: its entries, and where the next frame starts.
    Frame(Vec<Entry<'a>>, usize),
    /// A zero header or the end of the file: nothing was written here.
    End,
    /// Bytes that are not a whole frame.
    Broken,
}

fn frame_at(bytes: &[u8], at: usize) -> At<'_> {
    let Some(header) = bytes.get(at..at + HEADER) else {
        // A few bytes short of a header: end of file, or a header cut by it.
        return if bytes
            .get(at..)
            .is_some_and(|rest| rest.iter().any(|&b| b != 0))
        {
            At::Broken
        } else {
            At::End
        };
    };
    if header.iter().all(|&b| b == 0) {
        return At::End;
    }
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    let start = at + HEADER;
    let Some(payload) = bytes.get(start..start.saturating_add(len)) else {
        return At::Broken;
    };
    if len == 0 || crc32fast::hash(payload) != crc {
        return At::Broken;
    }
    match entries(payload, start as u64) {
        Some(entries) => At::Frame(entries, (start + len).next_multiple_of(ALIGN)),
        None => At::Broken,
    }
}

/// The offset of a whole frame at or after `from`, if any.
fn whole_frame_after(bytes: &[u8], from: usize) -> Option<usize> {
    let mut at = from.next_multiple_of(ALIGN);
    while at + HEADER < bytes.len() {
        // Cheap tests first: the zero-filled space and most garbage fail them.
        if bytes[at + HEADER] == TAG_BOUNDS && matches!(frame_at(bytes, at), At::Frame(..)) {
            return Some(at);
        }
        at += ALIGN;
    }
    None
}

/// How the reading of a segment ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ScanEnd {
    /// Where the last whole frame ends: the next frame goes there.
    pub valid_end: u64,
    /// Whether anything but zeros lies after it (a torn frame).
    pub torn: bool,
}

/// Why a segment cannot be read to its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Damage {
    /// Where the damaged frame starts.
    pub at: u64,
    /// What is wrong, for the error.
    pub what: String,
}

/// Reads the frames of one segment's bytes in order, handing each to `visit`; stops at
/// the end of what was written. See the module doc for the rule: `Err` when a whole
/// frame follows a broken one (or `visit` refuses a frame: its offset and why).
pub(crate) fn scan<'a>(
    bytes: &'a [u8],
    mut visit: impl FnMut(u64, Vec<Entry<'a>>) -> std::result::Result<(), String>,
) -> std::result::Result<ScanEnd, Damage> {
    let mut at = 0;
    loop {
        match frame_at(bytes, at) {
            At::Frame(entries, next) => {
                visit(at as u64, entries).map_err(|what| Damage {
                    at: at as u64,
                    what,
                })?;
                at = next;
            }
            end @ (At::End | At::Broken) => {
                if let Some(later) = whole_frame_after(bytes, at + ALIGN) {
                    return Err(Damage {
                        at: at as u64,
                        what: format!(
                            "the frame at byte {at} is damaged, and a whole frame follows at byte {later}"
                        ),
                    });
                }
                let torn = matches!(end, At::Broken)
                    || bytes
                        .get(at..)
                        .is_some_and(|rest| rest.iter().any(|&b| b != 0));
                return Ok(ScanEnd {
                    valid_end: at as u64,
                    torn,
                });
            }
        }
    }
}

/// Opens segment `seq` in `dir` for reading and writing.
pub(crate) fn open_file(dir: &Path, seq: u64, create: bool) -> Result<(File, PathBuf)> {
    let path = dir.join(file_name(seq));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(create)
        .open(&path)
        .map_err(|e| io_error("cannot open", &path, &e))?;
    Ok((file, path))
}

/// Syncs a folder, so that a file created or removed in it is too.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error("cannot sync", dir, &e))
}

/// The segments in `dir`, by sequence number; files that are not segments are left
/// alone.
pub(crate) fn list(dir: &Path) -> Result<Vec<u64>> {
    let read = std::fs::read_dir(dir).map_err(|e| io_error("cannot read", dir, &e))?;
    let mut seqs = Vec::new();
    for entry in read {
        let entry = entry.map_err(|e| io_error("cannot read", dir, &e))?;
        let name = entry.file_name();
        let Some(seq) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".seg"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        seqs.push(seq);
    }
    seqs.sort_unstable();
    Ok(seqs)
}

/// A frame written: where it went, and the segment it opened if it rolled over.
#[derive(Debug)]
pub(crate) struct Written {
    /// The segment it is in.
    pub seq: u64,
    /// Where it starts in that segment.
    pub at: u64,
    /// The new segment's file, when this frame started one.
    pub new_file: Option<Arc<File>>,
}

/// The appending end of the log: the last segment, where the next frame goes and how
/// far the segment is zero-filled. Only the writer thread uses it.
#[derive(Debug)]
pub(crate) struct SegmentWriter {
    dir: PathBuf,
    seq: u64,
    file: Arc<File>,
    path: PathBuf,
    write_at: u64,
    zeroed_to: u64,
    /// Where a segment is full ([`SEGMENT_BYTES`]; smaller in tests).
    segment_bytes: u64,
    /// Set when an `fdatasync` failed: the kernel may have dropped the pages it could
    /// not write and call them clean, so a later sync proves nothing. Every later
    /// write is refused until a restart reads the log again.
    broken: Option<String>,
}

/// Zeros written at a time while zero-filling.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

impl SegmentWriter {
    /// The writer of segment `seq` (open as `file`), whose frames end at `write_at` and
    /// whose bytes from there to its end are zeros.
    pub(crate) fn new(
        dir: &Path,
        seq: u64,
        file: Arc<File>,
        write_at: u64,
        segment_bytes: u64,
    ) -> Result<Self> {
        let path = dir.join(file_name(seq));
        let len = file
            .metadata()
            .map_err(|e| io_error("cannot read", &path, &e))?
            .len();
        Ok(Self {
            dir: dir.to_owned(),
            seq,
            file,
            path,
            write_at,
            zeroed_to: len.max(write_at),
            segment_bytes,
            broken: None,
        })
    }

    /// Writes `frame` at the end of the log and syncs it: when this returns `Ok`, the
    /// frame survives a crash and a power loss.
    pub(crate) fn append(&mut self, frame: &[u8]) -> Result<Written> {
        if let Some(broken) = &self.broken {
            return Err(EngineError::Storage(broken.clone()));
        }
        let mut new_file = None;
        let end = self.write_at + frame.len() as u64;
        if end > self.segment_bytes && self.write_at > 0 {
            new_file = Some(self.roll()?);
        }
        let end = self.write_at + frame.len() as u64;
        if end > self.zeroed_to {
            self.zero_fill(end)?;
        }
        let at = self.write_at;
        if let Err(e) = self.file.write_all_at(frame, at) {
            // Part of it may be there: cut it, so no half frame is ever followed by a
            // whole one (which would read as damage). Best effort: a torn frame at the
            // end is cut at the next open anyway.
            if self.file.set_len(at).is_ok() {
                self.zeroed_to = at;
            }
            return Err(io_error("cannot write", &self.path, &e));
        }
        if let Err(e) = self.file.sync_data() {
            let error = io_error("cannot sync", &self.path, &e);
            self.broken = Some(format!("{error}; restart the server to read the log again"));
            return Err(error);
        }
        self.write_at = (at + frame.len() as u64).next_multiple_of(ALIGN as u64);
        Ok(Written {
            seq: self.seq,
            at,
            new_file,
        })
    }

    /// Zero-fills the segment to at least `end` (a chunk ahead when there is room for
    /// it, only what this frame needs when the disk is nearly full) and syncs that.
    fn zero_fill(&mut self, end: u64) -> Result<()> {
        let ahead = (self.zeroed_to + ZERO_CHUNK)
            .min(self.segment_bytes)
            .max(end);
        let filled = self.write_zeros(ahead).or_else(|_| self.write_zeros(end));
        filled.map_err(|e| io_error("cannot grow", &self.path, &e))
    }

    fn write_zeros(&mut self, to: u64) -> std::io::Result<()> {
        let mut at = self.zeroed_to;
        while at < to {
            let n = (to - at).min(ZEROS.len() as u64) as usize;
            self.file.write_all_at(&ZEROS[..n], at)?;
            at += n as u64;
        }
        self.file.sync_data()?;
        self.zeroed_to = to;
        Ok(())
    }

    /// Starts the next segment (created, its folder synced so the file's name survives
    /// a crash).
    fn roll(&mut self) -> Result<Arc<File>> {
        let seq = self.seq + 1;
        let (file, path) = open_file(&self.dir, seq, true)?;
        sync_dir(&self.dir)?;
        let file = Arc::new(file);
        self.seq = seq;
        self.file = file.clone();
        self.path = path;
        self.write_at = 0;
        self.zeroed_to = 0;
        Ok(file)
    }

    /// The segment being written.
    pub(crate) fn seq(&self) -> u64 {
        self.seq
    }
}

/// Reads `len` bytes of text at `at` of `file` (a message's JSON).
pub(crate) fn read_text(file: &File, at: u64, len: u32) -> std::io::Result<String> {
    let mut buf = vec![0; len as usize];
    file.read_exact_at(&mut buf, at)?;
    String::from_utf8(buf).map_err(|e| std::io::Error::new(ErrorKind::InvalidData, e))
}
