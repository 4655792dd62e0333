//! The signaling connection: connects, joins, reconnects and resumes (the state is a sans-IO
//! [`SignalingClient`]; this is its WebSocket adapter), and turns what the server says into controller actions.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use webcall_protocol::{Event, PeerData, Signal, SignalingClient, SFU_PEER};

use crate::controller::Controller;
use crate::session::{self, ToSession};
use crate::{gather, out, sfu, PeerError};

/// Why the peer stops: asked to leave (duration over, SIGINT, SIGTERM) or for good.
pub(crate) struct Leave {
    pub deadline: Option<tokio::time::Instant>,
    pub term: tokio::signal::unix::Signal,
}

impl Leave {
    async fn deadline(deadline: Option<tokio::time::Instant>) {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    }

    /// Completes when the peer should leave.
    async fn requested(&mut self) {
        tokio::select! {
            _ = Self::deadline(self.deadline) => {}
            _ = tokio::signal::ctrl_c() => {}
            _ = self.term.recv() => {}
        }
    }
}

/// How signaling ended.
pub(crate) enum Ended {
    /// Asked to leave (the `bye` went out if a connection was up).
    Left,
    /// The server refused the join for good.
    Refused,
}

enum WsEnd {
    Leave,
    /// The connection dropped: reconnect.
    Lost,
    Refused,
}

/// What the sessions and stdin feed into signaling.
pub(crate) struct Inputs {
    pub signals: mpsc::UnboundedReceiver<(String, Signal)>,
    pub chat: mpsc::UnboundedReceiver<String>,
    pub stats: tokio::time::Interval,
}

/// Runs signaling until the peer leaves or is refused; reconnects (with backoff) and resumes by itself.
pub(crate) async fn run(c: &mut Controller, leave: &mut Leave, mut inputs: Inputs) -> Result<Ended, PeerError> {
    let server = c.args.server.clone();
    let mut join = webcall_protocol::Join::new(c.args.room.clone(), c.args.name.clone());
    join.sfu = c.args.sfu;
    join.token = c.args.token.clone().map(Into::into);
    join.password = c.args.password.clone().map(Into::into);
    let mut client = SignalingClient::new(join);
    let mut backoff = Duration::from_millis(200);
    loop {
        let ws = tokio::select! {
            // No Nagle: an offer, answer or candidate must not wait for the ACK of the message before it.
            r = tokio_tungstenite::connect_async_with_config(server.as_str(), None, true) => r,
            _ = leave.requested() => return Ok(Ended::Left),
        };
        let mut ws = match ws {
            Ok((ws, _)) => ws,
            Err(e) => {
                tracing::warn!("cannot reach {server}: {e}; retrying");
                if c.my_id.is_none() {
                    out(format!("signaling: cannot reach {server} ({e}); retrying"));
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = leave.requested() => return Ok(Ended::Left),
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        if ws.send(Message::text(client.connected())).await.is_err() {
            continue;
        }
        let end = loop {
            tokio::select! {
                m = ws.next() => {
                    let text = match m {
                        Some(Ok(Message::Text(t))) => t,
                        Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break WsEnd::Lost,
                        Some(Ok(_)) => continue,
                    };
                    let event = match client.receive(&text) {
                        Ok(e) => e,
                        Err(e) => { tracing::warn!("{e}"); continue; }
                    };
                    if matches!(event, Event::Welcome { .. }) {
                        backoff = Duration::from_millis(200);
                    }
                    match on_event(c, event).await {
                        Ok(true) => {}
                        Ok(false) => break WsEnd::Refused,
                        Err(e) => {
                            let _ = ws.send(Message::text(client.bye())).await;
                            return Err(e);
                        }
                    }
                }
                Some((to, s)) = inputs.signals.recv() => client.send(&to, &s),
                Some(line) = inputs.chat.recv() => {
                    let json: Arc<str> = session::chat_json(&line, &c.args.name).into();
                    // In an SFU room there are no data channels: chat goes to everyone as signaling `data`.
                    if c.sfu.is_some() {
                        match serde_json::value::RawValue::from_string(json.to_string()) {
                            Ok(raw) => client.send_data(&raw),
                            Err(e) => tracing::warn!("chat not sent: {e}"),
                        }
                    } else {
                        for p in c.peers.values() {
                            let _ = p.tx.send(ToSession::Chat(json.clone()));
                        }
                    }
                }
                _ = inputs.stats.tick() => {
                    // The SFU path is up: the peer-to-peer one goes (what it saw stays in the reports).
                    let via_sfu = c.sfu.as_ref().is_some_and(|s| s.counters.connected.load(Ordering::Relaxed));
                    if via_sfu && !c.peers.is_empty() {
                        out(format!("closing {} peer-to-peer connection(s): media goes through the sfu", c.peers.len()));
                        c.close_all();
                    }
                    c.print_stats(false);
                }
                _ = leave.requested() => break WsEnd::Leave,
            }
            // Whatever the client has to write now: relayed signals, and after a resume the ones held meanwhile.
            let mut lost = false;
            while let Some(frame) = client.poll_transmit() {
                if let Err(e) = ws.send(Message::text(frame.clone())).await {
                    tracing::debug!("signaling write failed: {e}");
                    client.disconnected(Some(frame));
                    lost = true;
                    break;
                }
            }
            if lost {
                break WsEnd::Lost;
            }
        };
        match end {
            WsEnd::Leave => {
                let _ = ws.send(Message::text(client.bye())).await;
                let _ = ws.close(None).await;
                return Ok(Ended::Left);
            }
            WsEnd::Refused => return Ok(Ended::Refused),
            WsEnd::Lost => {
                client.disconnected(None);
                out("signaling: connection lost; reconnecting");
                // Media keeps flowing peer to peer meanwhile; the sessions stay up, and what they signal waits
                // in the client for the resume.
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = Leave::deadline(leave.deadline) => return Ok(Ended::Left),
                }
            }
        }
    }
}

/// Acts on one server event; `Ok(false)`: the join was refused for good.
async fn on_event(c: &mut Controller, event: Event) -> Result<bool, PeerError> {
    match event {
        Event::Welcome { id, room, peers, ice_servers, resumed, fresh, .. } => {
            c.ice = gather::IceConfig::from_servers(&ice_servers, c.args.relay);
            if c.args.relay && c.ice.turn.is_empty() {
                return Err(PeerError::NoRelay);
            }
            if fresh {
                out(format!(
                    "signaling: session not resumed; rejoined as a new peer, rebuilding {} connection(s)",
                    c.peers.len()
                ));
                c.close_all();
                c.close_sfu();
            }
            out(format!("joined room {room} as {id}{}", if resumed { " (resumed)" } else { "" }));
            c.my_id = Some(id);
            c.joined = true;
            for p in peers {
                if let Some(s) = &c.sfu {
                    s.send(sfu::ToSfu::Name { id: p.id.clone(), name: p.name.clone() });
                }
                c.names.insert(p.id, p.name);
            }
        }
        Event::Hello { from, name } => {
            out(format!("peer {from} joined ({name})"));
            c.names.insert(from.clone(), name.clone());
            match &c.sfu {
                // Its media comes through the SFU's offers.
                Some(s) => s.send(sfu::ToSfu::Name { id: from, name }),
                None => c.start_session(&from, true),
            }
        }
        Event::Signal { from, signal, tracks } if from == SFU_PEER => {
            if let Some(s) = &c.sfu {
                match signal {
                    Signal::Offer(sdp) => s.send(sfu::ToSfu::Offer { sdp, tracks }),
                    Signal::Answer(sdp) => s.send(sfu::ToSfu::Answer(sdp)),
                    Signal::Candidate(_) => {}
                }
            }
        }
        Event::Signal { from, signal, .. } => match signal {
            Signal::Offer(sdp) => {
                if !c.peers.contains_key(&from) {
                    c.start_session(&from, false);
                }
                c.to_peer(&from, ToSession::Offer(sdp));
            }
            Signal::Answer(sdp) => c.to_peer(&from, ToSession::Answer(sdp)),
            Signal::Candidate(cand) => c.to_peer(&from, ToSession::Candidate(cand)),
        },
        Event::Bye { from } => {
            out(format!("peer {from} left"));
            if let Some(p) = c.peers.remove(&from) {
                let _ = p.tx.send(ToSession::Close);
            }
        }
        Event::Topology { mode, restart } if mode == "sfu" && c.args.sfu => {
            if restart {
                // The room's SFU moved to another cluster node: the old session is dead, a new one starts.
                out("sfu restart");
                c.close_sfu();
            }
            c.start_sfu().await?
        }
        Event::Topology { .. } => {}
        // The page highlights the speaker; the native peer has no tiles.
        Event::Speaker { .. } => {}
        // Everyone in a room sees that it is recorded: here, a line on stdout.
        Event::Recording { active, by } => {
            let by = by.map(|b| format!(" by {b}")).unwrap_or_default();
            out(format!("room recording {}{by}", if active { "on" } else { "off" }));
        }
        // Chat of an SFU room; media state, names and hands are the page's business.
        Event::Data { from, data } => {
            let Some(PeerData::Chat { text, name, .. }) = PeerData::from_value(&data) else {
                tracing::debug!("data from {from} ignored");
                return Ok(true);
            };
            let name = Some(name.as_str()).filter(|n| !n.is_empty()).or(c.names.get(&from).map(String::as_str));
            if let Some(r) = c.sfu.iter().flat_map(|s| s.reports()).find(|r| r.lock().unwrap().id == from) {
                r.lock().unwrap().chat_in += 1;
            }
            if c.args.chat {
                session::print_chat(name.filter(|n| !n.is_empty()).unwrap_or(&from), &text);
            }
        }
        Event::Error { code, message, join_refused, .. } => {
            out(format!("signaling error {code}: {message}"));
            return Ok(!join_refused);
        }
    }
    Ok(true)
}
