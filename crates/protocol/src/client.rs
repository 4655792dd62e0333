//! A sans-IO signaling client: frames in, typed events and frames out. No sockets and no clock; the caller opens
//! the WebSocket, writes what [`SignalingClient::poll_transmit`] yields and feeds back what it reads.
//!
//! It keeps what resuming needs across connections (the peer id and resume token of the last `welcome`) and the
//! signals produced while no connection was live: they go out after a resume and are dropped after a fresh join
//! (the peers they were meant for no longer know this client).
//!
//! ```
//! use webcall_protocol::{Event, Join, Signal, SignalingClient};
//! let mut c = SignalingClient::new(Join::new("daily", "Alice"));
//! let join = c.connected(); // write it first on every new connection
//! assert!(join.contains(r#""type":"join""#));
//! c.send("P7dLw1zQe9", &Signal::Offer("v=0\r\n".into())); // not live yet: kept for later
//! let ev = c.receive(r#"{"type":"welcome","id":"Yx3kq0tVb2","room":"daily","peers":[],"iceServers":[],"resume":"t","resumed":false}"#).unwrap();
//! assert!(matches!(ev, Event::Welcome { fresh: false, .. }));
//! assert!(c.poll_transmit().unwrap().contains(r#""to":"P7dLw1zQe9""#));
//! ```

use crate::{IceServer, Join, PeerInfo, ServerMessage, SfuTrack, Signal, BYE};
use std::collections::VecDeque;

/// A server frame the client could not read.
#[derive(Debug, thiserror::Error)]
#[error("unreadable server message ({source}); is the server speaking webcall protocol v1? {text}")]
pub struct ClientError {
    /// The frame, shortened to 200 characters.
    pub text: String,
    pub source: serde_json::Error,
}

/// What a server frame means to the client.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Joined (or resumed). `fresh`: an earlier session of this client was not resumed, so this is a new peer id
    /// and every connection made under the old one is stale (the signals queued for it were dropped).
    Welcome {
        id: String,
        room: String,
        peers: Vec<PeerInfo>,
        ice_servers: Vec<IceServer>,
        resumed: bool,
        publish: bool,
        fresh: bool,
    },
    Hello {
        from: String,
        name: String,
    },
    /// `offer`, `answer` or `candidate` from `from` (a peer id or [`crate::SFU_PEER`]).
    Signal {
        from: String,
        signal: Signal,
        tracks: Vec<SfuTrack>,
    },
    Bye {
        from: String,
    },
    /// `restart`: the room's SFU moved (a cluster node died); make a new connection to it.
    Topology {
        mode: String,
        restart: bool,
    },
    /// The SFU room's active speaker changed.
    Speaker {
        peer: String,
    },
    /// The room is being recorded (`active`) or no longer; `by` who started or stopped it.
    Recording {
        active: bool,
        by: Option<String>,
    },
    /// Member `from` of the SFU room sent `data` (chat, media state, name, hand).
    Data {
        from: String,
        data: serde_json::Value,
    },
    /// The server refused a message. `join_refused`: it refused this connection's join (before any welcome on
    /// it), so reconnecting will not help.
    Error {
        code: String,
        message: String,
        refers_to: Option<String>,
        join_refused: bool,
    },
}

/// One client's signaling state across connections.
#[derive(Debug)]
pub struct SignalingClient {
    join: Join<'static>,
    id: Option<String>,
    /// Welcomed on the current connection.
    live: bool,
    /// Signals made while not live, as frames (addressed already).
    outbox: Vec<String>,
    transmit: VecDeque<String>,
}

impl SignalingClient {
    /// A client that joins with `join` (its `resume` is replaced by the last welcome's token on reconnects).
    pub fn new(join: Join<'static>) -> Self {
        SignalingClient { join, id: None, live: false, outbox: Vec::new(), transmit: VecDeque::new() }
    }

    /// A new connection is open: the `join` frame to write first (resuming the last session, if any).
    pub fn connected(&mut self) -> String {
        self.live = false;
        self.transmit.clear();
        self.join.to_json()
    }

    /// The connection is gone. `unsent`: a frame from [`Self::poll_transmit`] or [`Self::send`] whose write
    /// failed; it goes out after the next resume.
    pub fn disconnected(&mut self, unsent: Option<String>) {
        self.live = false;
        self.outbox.extend(unsent);
        self.outbox.extend(self.transmit.drain(..));
    }

    /// Relays `signal` to `to`: written now if live (see [`Self::poll_transmit`]), else after the next resume.
    pub fn send(&mut self, to: &str, signal: &Signal) {
        self.queue(signal.to_json(to));
    }

    fn queue(&mut self, frame: String) {
        if self.live {
            self.transmit.push_back(frame);
        } else {
            self.outbox.push(frame);
        }
    }

    /// Sends `data` (a JSON object: chat, media state, name, hand) to every other member of the SFU room, like
    /// [`Self::send`]: now if live, else after the next resume.
    pub fn send_data(&mut self, data: &serde_json::value::RawValue) {
        self.queue(crate::ClientMessage::Data(data).to_json());
    }

    /// The `bye` frame (leaving the room for good).
    pub fn bye(&mut self) -> &'static str {
        self.live = false;
        BYE
    }

    /// The next frame to write, if any.
    pub fn poll_transmit(&mut self) -> Option<String> {
        self.transmit.pop_front()
    }

    /// One text frame from the server.
    pub fn receive(&mut self, text: &str) -> Result<Event, ClientError> {
        let msg = ServerMessage::parse(text)
            .map_err(|source| ClientError { text: text.chars().take(200).collect(), source })?;
        Ok(match msg {
            ServerMessage::Welcome { id, room, peers, ice_servers, resume, resumed, publish } => {
                let fresh = self.id.as_deref().is_some_and(|old| old != id);
                if fresh {
                    self.outbox.clear();
                }
                self.id = Some(id.clone());
                self.join.resume = Some(resume.into());
                self.live = true;
                self.transmit.extend(self.outbox.drain(..));
                Event::Welcome { id, room, peers, ice_servers, resumed, publish, fresh }
            }
            ServerMessage::Hello { from, name } => Event::Hello { from, name },
            ServerMessage::Offer { from, sdp, tracks } => {
                Event::Signal { from, signal: Signal::Offer(sdp), tracks: tracks.unwrap_or_default() }
            }
            ServerMessage::Answer { from, sdp } => Event::Signal { from, signal: Signal::Answer(sdp), tracks: vec![] },
            ServerMessage::Candidate { from, candidate } => {
                Event::Signal { from, signal: Signal::Candidate(candidate), tracks: vec![] }
            }
            ServerMessage::Bye { from } => Event::Bye { from },
            ServerMessage::Topology { mode, restart } => Event::Topology { mode, restart },
            ServerMessage::Speaker { peer } => Event::Speaker { peer },
            ServerMessage::Recording { active, by } => Event::Recording { active, by },
            ServerMessage::Data { from, data } => Event::Data { from, data },
            ServerMessage::Error { code, message, refers_to } => {
                let join_refused = !self.live && refers_to.as_deref() == Some("join");
                Event::Error { code, message, refers_to, join_refused }
            }
        })
    }

    /// This client's peer id (from the last welcome).
    pub fn id(&self) -> Option<&str> {
        self.id.as_deref()
    }

    /// The resume token of the last welcome.
    pub fn resume_token(&self) -> Option<&str> {
        self.join.resume.as_deref()
    }

    /// Welcomed on the current connection.
    pub fn is_live(&self) -> bool {
        self.live
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{encode_hello, encode_welcome, parse_client, ClientMessage, ErrorCode, ProtocolError};

    fn welcome(id: &str, resume: &str, resumed: bool) -> String {
        encode_welcome(id, "r", &[PeerInfo { id: "B".into(), name: "Bob".into() }], &[], resume, resumed, true)
    }

    #[test]
    fn joins_then_resumes_with_the_last_token() {
        let mut c = SignalingClient::new(Join::new("r", "Ann"));
        let first = c.connected();
        let ClientMessage::Join(j) = parse_client(&first).unwrap() else { panic!() };
        assert_eq!((&*j.room, &*j.name, j.resume), ("r", "Ann", None));
        let ev = c.receive(&welcome("A", "t1", false)).unwrap();
        let Event::Welcome { id, peers, fresh, .. } = ev else { panic!("{ev:?}") };
        assert_eq!((id.as_str(), peers.len(), fresh), ("A", 1, false));
        assert_eq!((c.id(), c.resume_token(), c.is_live()), (Some("A"), Some("t1"), true));
        c.disconnected(None);
        let again = c.connected();
        let ClientMessage::Join(j) = parse_client(&again).unwrap() else { panic!() };
        assert_eq!(j.resume.as_deref(), Some("t1"));
    }

    #[test]
    fn signals_wait_for_a_resume_and_are_dropped_by_a_fresh_join() {
        let mut c = SignalingClient::new(Join::new("r", ""));
        c.connected();
        c.receive(&welcome("A", "t1", false)).unwrap();
        c.send("B", &Signal::Offer("o".into()));
        let sent = c.poll_transmit().unwrap();
        assert!(matches!(parse_client(&sent), Ok(ClientMessage::Relay(_))));
        // A write failed and the connection dropped: the frame and later signals go out after the resume.
        c.disconnected(Some(sent.clone()));
        c.send("B", &Signal::Candidate(None));
        assert_eq!(c.poll_transmit(), None);
        c.connected();
        c.receive(&welcome("A", "t2", true)).unwrap();
        assert_eq!(c.poll_transmit(), Some(sent));
        assert_eq!(c.poll_transmit(), Some(Signal::Candidate(None).to_json("B")));
        assert_eq!(c.poll_transmit(), None);
        // Not resumed: a new id, and what was queued for the old one is dropped.
        c.disconnected(None);
        c.send("B", &Signal::Answer("a".into()));
        c.connected();
        let ev = c.receive(&welcome("A2", "t3", false)).unwrap();
        assert!(matches!(ev, Event::Welcome { fresh: true, .. }), "{ev:?}");
        assert_eq!(c.poll_transmit(), None);
    }

    #[test]
    fn events_are_typed_and_a_refused_join_says_so() {
        let mut c = SignalingClient::new(Join::new("r", ""));
        c.connected();
        let refused = ProtocolError::new(ErrorCode::RoomFull, "full").refers_to("join").to_json();
        let Event::Error { code, join_refused, .. } = c.receive(&refused).unwrap() else { panic!() };
        assert_eq!((code.as_str(), join_refused), ("room-full", true));
        c.receive(&welcome("A", "t", false)).unwrap();
        assert_eq!(
            c.receive(&encode_hello("B", "Bob")).unwrap(),
            Event::Hello { from: "B".into(), name: "Bob".into() }
        );
        let ev = c.receive(r#"{"type":"candidate","from":"B","candidate":null}"#).unwrap();
        assert_eq!(ev, Event::Signal { from: "B".into(), signal: Signal::Candidate(None), tracks: vec![] });
        let Event::Error { join_refused, .. } = c.receive(&refused).unwrap() else { panic!() };
        assert!(!join_refused, "a join refused on a live connection does not end it");
        assert!(c.receive("{\"type\":\"dance\"}").is_err());
    }
}
