//! Writes recordings ([`RecordOp`]s) to disk on a thread of its own, so that the SFU thread never waits on a disk:
//! it only sends to an unbounded channel.
//!
//! Layout: `DIR/<room>/<start>-<participant>-<kind>-<mid>.<webm|mkv>`, `<start>` the UTC time the file was opened
//! (`20261128T123930.123Z`). Room names are `[A-Za-z0-9_-]` already; every component is escaped anyway
//! ([`component`]), so no client-chosen string can name another directory.

use std::collections::HashMap;
use std::collections::HashSet;
use std::fs::File;
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::SystemTime;

use str0m::media::MediaKind;
use tokio::sync::oneshot;

use crate::record::RecordOp;

/// Bytes queued for the disk at most; past it a file's later clusters are dropped and it ends where it got to (a
/// disk that does not keep up must not take the server's memory).
pub const MAX_BACKLOG: usize = 256 << 20;

enum Msg {
    Op(RecordOp),
    /// The file was cut short (see [`MAX_BACKLOG`]): close it as it is, without its size and duration.
    Abandon(u64),
    /// Everything sent before is written: reply.
    Flush(oneshot::Sender<()>),
}

/// The writer thread's handle; the thread ends (closing what is open) when it is dropped.
pub struct RecordWriter {
    tx: mpsc::Sender<Msg>,
    /// Bytes sent and not yet written.
    backlog: Arc<AtomicUsize>,
    /// Files whose clusters were dropped: what follows is dropped too.
    cut: HashSet<u64>,
}

impl RecordWriter {
    /// Creates `dir` if needed, checks it is writable and starts the thread.
    pub fn start(dir: PathBuf) -> io::Result<RecordWriter> {
        std::fs::create_dir_all(&dir)?;
        let probe = dir.join(".webcall-write-test");
        File::create(&probe)?;
        let _ = std::fs::remove_file(&probe);
        let (tx, rx) = mpsc::channel();
        let backlog = Arc::new(AtomicUsize::new(0));
        let b = backlog.clone();
        std::thread::Builder::new().name("webcall-record".into()).spawn(move || run(dir, rx, b))?;
        Ok(RecordWriter { tx, backlog, cut: HashSet::new() })
    }

    pub fn send(&mut self, op: RecordOp) {
        let msg = match op {
            RecordOp::Append { file, .. } | RecordOp::Close { file, .. } if self.cut.contains(&file) => {
                if matches!(op, RecordOp::Close { .. }) {
                    self.cut.remove(&file);
                    let _ = self.tx.send(Msg::Abandon(file));
                }
                return;
            }
            RecordOp::Append { file, bytes } if self.backlog.load(Ordering::Relaxed) + bytes.len() > MAX_BACKLOG => {
                tracing::error!("recording file {file} cut short: the disk does not keep up (--record-dir)");
                self.cut.insert(file);
                return;
            }
            RecordOp::Append { file, bytes } => {
                self.backlog.fetch_add(bytes.len(), Ordering::Relaxed);
                Msg::Op(RecordOp::Append { file, bytes })
            }
            op => Msg::Op(op),
        };
        let _ = self.tx.send(msg);
    }

    /// `reply` is sent once everything sent before is on disk.
    pub fn flush(&self, reply: oneshot::Sender<()>) {
        let _ = self.tx.send(Msg::Flush(reply));
    }
}

/// A path component from any string: `[A-Za-z0-9_]` kept, every other byte `%XX` (so `.`, `/` and `-` can never
/// appear raw), at most 64 bytes of input.
pub fn component(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes().take(64) {
        if b.is_ascii_alphanumeric() || b == b'_' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.is_empty() {
        out.push('_');
    }
    out
}

/// `DIR/<room>/<start>-<participant>-<kind>-<mid>.<ext>` (see the module documentation).
pub fn file_path(
    dir: &Path,
    room: &str,
    participant: &str,
    kind: MediaKind,
    mid: &str,
    ext: &str,
    at: SystemTime,
) -> PathBuf {
    let t: String =
        humantime::format_rfc3339_millis(at).to_string().chars().filter(|c| *c != '-' && *c != ':').collect();
    let kind = if kind == MediaKind::Audio { "audio" } else { "video" };
    let name = format!("{t}-{}-{kind}-{}.{ext}", component(participant), component(mid));
    // Room names may hold '-' (harmless in a directory name); the file name keeps it as its separator.
    dir.join(component(room).replace("%2D", "-")).join(name)
}

struct Open {
    path: PathBuf,
    w: BufWriter<File>,
}

fn run(dir: PathBuf, rx: mpsc::Receiver<Msg>, backlog: Arc<AtomicUsize>) {
    let mut files: HashMap<u64, Open> = HashMap::new();
    while let Ok(msg) = rx.recv() {
        match msg {
            Msg::Abandon(file) => {
                if let Some(mut f) = files.remove(&file) {
                    // It ends on a cluster boundary: playable, without duration.
                    let _ = f.w.flush();
                    tracing::warn!("recording {} ended early (the disk fell behind)", f.path.display());
                }
            }
            Msg::Flush(reply) => {
                for f in files.values_mut() {
                    let _ = f.w.flush();
                }
                let _ = reply.send(());
            }
            Msg::Op(RecordOp::Open { file, room, participant, kind, mid, extension }) => {
                let path = file_path(&dir, &room, &participant, kind, &mid, extension, SystemTime::now());
                match create(&path) {
                    Ok((path, w)) => {
                        tracing::info!("recording {}", path.display());
                        files.insert(file, Open { path, w });
                    }
                    Err(e) => tracing::error!("cannot create recording {}: {e}", path.display()),
                }
            }
            Msg::Op(RecordOp::Append { file, bytes }) => {
                backlog.fetch_sub(bytes.len(), Ordering::Relaxed);
                if let Some(f) = files.get_mut(&file) {
                    // Each append is a header or a whole cluster: handed to the OS at once, a killed server leaves a
                    // file that ends on a cluster boundary.
                    if let Err(e) = f.w.write_all(&bytes).and_then(|()| f.w.flush()) {
                        tracing::error!("recording {} stopped: {e}", f.path.display());
                        files.remove(&file);
                    }
                }
            }
            Msg::Op(RecordOp::Close { file, tail, patches, frames }) => {
                if let Some(f) = files.remove(&file) {
                    let path = f.path.clone();
                    match close(f, &tail, &patches) {
                        Ok(()) => tracing::info!("recording {} done: {frames} frames", path.display()),
                        Err(e) => tracing::error!("recording {} not finished: {e}", path.display()),
                    }
                }
            }
        }
    }
    // The SFU is gone without a stop (it should not be): what is written is still a playable file.
    for (_, mut f) in files {
        let _ = f.w.flush();
    }
}

/// Creates the file, never over an existing one: a name taken (the same track opened twice in a millisecond) gets
/// `-2`, `-3`… before its extension. Returns the path used.
fn create(path: &Path) -> io::Result<(PathBuf, BufWriter<File>)> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut p = path.to_path_buf();
    for n in 2..100 {
        match File::options().write(true).create_new(true).open(&p) {
            Ok(f) => return Ok((p, BufWriter::new(f))),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("recording");
                let ext = path.extension().and_then(|s| s.to_str()).unwrap_or("webm");
                p = path.with_file_name(format!("{stem}-{n}.{ext}"));
            }
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(io::ErrorKind::AlreadyExists, "every name for this recording is taken"))
}

fn close(mut f: Open, tail: &[u8], patches: &[(u64, Vec<u8>)]) -> io::Result<()> {
    f.w.write_all(tail)?;
    f.w.flush()?;
    let mut file = f.w.into_inner().map_err(|e| e.into_error())?;
    for (at, bytes) in patches {
        file.seek(SeekFrom::Start(*at))?;
        file.write_all(bytes)?;
    }
    file.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn a_taken_name_gets_a_number() {
        let dir = std::env::temp_dir().join(format!("webcall-writer-{}", std::process::id()));
        let path = dir.join("r").join("t-p-video-1.webm");
        let (a, _) = create(&path).unwrap();
        let (b, _) = create(&path).unwrap();
        assert_eq!((a, b.file_name().unwrap().to_str().unwrap()), (path.clone(), "t-p-video-1-2.webm"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn names_cannot_escape_the_directory() {
        assert_eq!(component("../etc"), "%2E%2E%2Fetc");
        assert_eq!(component("a-b_C9"), "a%2Db_C9");
        assert_eq!(component(""), "_");
        let at = UNIX_EPOCH + Duration::from_millis(1_795_869_570_123);
        let p = file_path(Path::new("/rec"), "daily", "../x", MediaKind::Video, "0", "webm", at);
        assert_eq!(p, Path::new("/rec/daily/20261128T123930.123Z-%2E%2E%2Fx-video-0.webm"));
    }
}
