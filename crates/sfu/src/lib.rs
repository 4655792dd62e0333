//! webcall's selective forwarding unit (issue 14).
//!
//! [`core::Sfu`] is a state machine without I/O in str0m's style (datagrams and time in; datagrams, events and
//! the next timeout out), one str0m `Rtc` per participant session. [`net`] is the thin tokio adapter that owns
//! the media sockets (UDP with batched I/O, and ICE-TCP on the same port).

pub mod core;
pub mod mux;
pub mod net;
pub mod record;
pub mod rtp;
pub mod tcp;
pub mod writer;

pub use crate::core::{
    Caps, SessionId, SessionRole, Sfu, SfuConfig, SfuError, SfuEvent, SfuOutput, SfuStats, TrackInfo, Transmit, View,
};
pub use crate::record::RecordOp;
