//! A room core driven by hand, in simulated time: the core's tests and those of layers around it (feature
//! `harness`).

use crate::{ConnId, Output, RoomCore, Rooms};
use serde_json::Value;
use std::time::{Duration, Instant};

/// A room core ([`Rooms`], or a layer around one) driven by hand, in simulated time.
pub struct Harness<R: RoomCore = Rooms> {
    pub rooms: R,
    pub now: Instant,
    next_conn: ConnId,
    /// Outputs polled but not yet looked at (connection outputs, SFU requests and leaves are read separately).
    polled: Vec<Output<R::Extra>>,
}

impl<R: RoomCore> Harness<R> {
    /// Drives `rooms` from `now` on.
    pub fn over(rooms: R, now: Instant) -> Self {
        Harness { rooms, now, next_conn: 1, polled: Vec::new() }
    }
    /// The single-node core inside.
    pub fn core(&mut self) -> &mut Rooms {
        self.rooms.borrow_mut()
    }
    /// An unused connection id (for connecting some other way than [`Harness::connect`]).
    pub fn conn_id(&mut self) -> ConnId {
        self.next_conn += 1;
        self.next_conn - 1
    }
    /// A new connection.
    pub fn connect(&mut self) -> ConnId {
        let (c, now) = (self.conn_id(), self.now);
        self.core().connect(c, now);
        c
    }
    /// A text frame from `conn`.
    pub fn send(&mut self, conn: ConnId, text: &str) {
        let now = self.now;
        self.rooms.message(conn, text, now);
    }
    pub fn send_json(&mut self, conn: ConnId, v: Value) {
        self.send(conn, &v.to_string());
    }
    /// Everything queued for `conn`, parsed.
    pub fn recv(&mut self, conn: ConnId) -> Vec<Value> {
        self.core().check_invariants();
        let mut buf = Vec::new();
        self.core().take(conn, &mut buf);
        buf.iter().map(|f| serde_json::from_str(f).unwrap()).collect()
    }
    /// The outputs but SFU requests and leaves, in order.
    pub fn outputs(&mut self) -> Vec<Output<R::Extra>> {
        self.split(|o| !matches!(o, Output::Sfu(_) | Output::Left { .. }))
    }
    /// The outputs (in order) that `pick` selects; the others stay for the next look.
    pub fn split(&mut self, pick: impl Fn(&Output<R::Extra>) -> bool) -> Vec<Output<R::Extra>> {
        let polled: Vec<Output<R::Extra>> = std::iter::from_fn(|| self.rooms.poll_output()).collect();
        self.polled.extend(polled);
        let (picked, rest) = std::mem::take(&mut self.polled).into_iter().partition(|o| pick(o));
        self.polled = rest;
        picked
    }
    /// Lets `d` pass and ticks the core.
    pub fn advance(&mut self, d: Duration) {
        self.now += d;
        let now = self.now;
        self.core().tick(now);
    }
}
