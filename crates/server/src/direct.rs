//! Direct writes: a frame relayed to a connection with nothing else to write goes from the sender's task straight
//! into the receiver's socket, instead of waking the receiver's task to take and write it. That hand-off (a wake-up,
//! a task switch, the receiver's poll) was most of what the relay cost above the kernel's floor of one receive and
//! one send per message (BENCHMARKS.md, "Relay against the kernel floor").
//!
//! Order holds because every write to a connection, direct or by its own task, happens under its [`Direct`] lock:
//! a direct write only happens while the connection's task is not writing (`busy`), and what the socket does not
//! take at once is left (`leftover`) for the task, which writes it before anything else. Over TLS there is no
//! direct path (the record layer belongs to the connection's task).

use crate::router::{ConnSignal, Router};
use parking_lot::Mutex;
use std::cell::RefCell;
use std::io;
use std::sync::Arc;
use webcall_rooms::{ConnId, Frame};
use webcall_wsframe::opcode;

/// The write side of a plain-TCP WebSocket, shared between its own task and the tasks relaying to it.
pub struct Direct {
    conn: ConnId,
    stream: Arc<tokio::net::TcpStream>,
    state: Mutex<WriteState>,
}

#[derive(Default)]
struct WriteState {
    /// The connection's task is writing (or has `leftover` to write): no direct write now.
    busy: bool,
    /// The connection is closing: nothing more may be written directly.
    closed: bool,
    /// Bytes of a direct write the socket did not take; the task writes them first.
    leftover: Vec<u8>,
}

impl Direct {
    pub fn new(conn: ConnId, stream: Arc<tokio::net::TcpStream>) -> Self {
        Direct { conn, stream, state: Mutex::new(WriteState::default()) }
    }
}

/// A direct write's encoded frames and its frame list, kept per thread so a relay allocates nothing.
struct Scratch {
    frames: Vec<Frame>,
    bytes: Vec<u8>,
}

/// Keep at most this much per thread between writes (a burst's buffer is given back).
const SCRATCH_KEEP: usize = 64 * 1024;

thread_local! {
    /// `Some` while a relay runs on this thread: connections to wake are collected here instead.
    static DEFERRED: RefCell<Option<Vec<Arc<ConnSignal>>>> = const { RefCell::new(None) };
    static SPARE: RefCell<Vec<Arc<ConnSignal>>> = const { RefCell::new(Vec::new()) };
    static SCRATCH: RefCell<Scratch> = const { RefCell::new(Scratch { frames: Vec::new(), bytes: Vec::new() }) };
}

/// Called by the router for a connection that has frames to take: `true` if it was collected for a direct write
/// after the relay (see [`relaying`]), `false` to wake its task now.
pub(crate) fn defer(signal: &Arc<ConnSignal>) -> bool {
    if signal.direct.get().is_none() {
        return false;
    }
    DEFERRED.with(|d| match d.borrow_mut().as_mut() {
        Some(list) => {
            list.push(signal.clone());
            true
        }
        None => false,
    })
}

/// Runs `feed` (a message into the router) collecting the connections it gives frames to, then writes their frames
/// straight into their sockets where it can and wakes the tasks of the rest. Outside the router's lock, so one
/// slow system call does not hold up other rooms.
pub(crate) fn relaying<R>(router: &dyn Router, feed: impl FnOnce() -> R) -> R {
    let list = SPARE.with(|s| std::mem::take(&mut *s.borrow_mut()));
    let outer = DEFERRED.with(|d| d.borrow_mut().replace(list));
    debug_assert!(outer.is_none(), "relaying does not nest");
    let r = feed();
    let mut list = DEFERRED.with(|d| d.borrow_mut().take()).unwrap_or_default();
    for signal in list.drain(..) {
        if !write_now(router, &signal) {
            signal.wake.notify_one();
        }
    }
    SPARE.with(|s| *s.borrow_mut() = list);
    r
}

/// Takes `signal`'s frames and writes them into its socket; `false` when its task must be woken instead (it is
/// writing, closing, or the socket did not take everything).
fn write_now(router: &dyn Router, signal: &ConnSignal) -> bool {
    let Some(d) = signal.direct.get() else { return false };
    if signal.close_requested().is_some() {
        return false;
    }
    // Contended only when the task itself is starting or ending a write: let it do this one.
    let Some(mut st) = d.state.try_lock() else { return false };
    if st.busy || st.closed {
        return false;
    }
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        let Scratch { frames, bytes } = &mut *s;
        router.take(d.conn, frames);
        if frames.is_empty() {
            return true;
        }
        bytes.clear();
        for f in frames.iter() {
            webcall_wsframe::encode(bytes, opcode::TEXT, f.as_bytes());
        }
        frames.clear();
        let written = match d.stream.try_write(bytes) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            // The task's next write fails the same way and closes the connection.
            Err(_) => 0,
        };
        let done = written == bytes.len();
        if !done {
            st.leftover.extend_from_slice(&bytes[written..]);
            st.busy = true;
        }
        if bytes.capacity() > SCRATCH_KEEP {
            *bytes = Vec::new();
        }
        done
    })
}

impl ConnSignal {
    /// The connection's own task starts a write (`closing`: the last one, a close frame follows or the connection
    /// ends). Returns what direct writes left unwritten: write that first.
    pub fn begin_write(&self, closing: bool) -> Vec<u8> {
        let Some(d) = self.direct.get() else { return Vec::new() };
        let mut st = d.state.lock();
        st.busy = true;
        st.closed |= closing;
        std::mem::take(&mut st.leftover)
    }

    /// The task's write is over: direct writes may go on (unless the connection is closing).
    pub fn end_write(&self) {
        if let Some(d) = self.direct.get() {
            d.state.lock().busy = false;
        }
    }
}
