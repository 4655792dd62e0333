//! Connects SFU rooms of the room core to the SFU task: one small task per peer keeps that peer's signaling in
//! order (offer before its candidates) and talks to [`SfuHandle`].

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use tokio::sync::mpsc;
use webcall_protocol::{
    encode_sfu_answer, encode_sfu_offer, encode_speaker, ErrorCode, ProtocolError, RelayKind, SfuTrack,
};
use webcall_rooms::SfuRequest;
use webcall_sfu::net::{SessionSignal, SfuHandle, SfuNetError};
use webcall_sfu::{SessionId, SfuError};

/// Where the SFU's frames for a peer go (its offers, answers, speaker events, refusals): the router, which
/// queues them for the peer's connection (or, in a cluster, sends them to the peer's node).
pub trait SfuSink: Send + Sync + 'static {
    fn sfu_frame(&self, peer: &str, frame: String);
}

type Router = Weak<dyn SfuSink>;

pub struct SfuBridge {
    handle: SfuHandle,
    router: Router,
    peers: HashMap<Arc<str>, mpsc::UnboundedSender<SfuRequest>>,
}

impl SfuBridge {
    pub fn new(handle: SfuHandle, router: Router) -> Self {
        SfuBridge { handle, router, peers: HashMap::new() }
    }

    pub fn route(&mut self, req: SfuRequest) {
        if let SfuRequest::Record { room, start } = req {
            let handle = self.handle.clone();
            tokio::spawn(async move {
                if let Err(e) = handle.record(&room, start).await {
                    tracing::error!("recording of room {room} not {}: {e}", if start { "started" } else { "stopped" });
                }
            });
            return;
        }
        let peer = match &req {
            SfuRequest::Signal { peer, .. } | SfuRequest::Leave { peer, .. } | SfuRequest::View { peer, .. } => {
                peer.clone()
            }
            SfuRequest::Record { .. } => unreachable!("handled above"),
        };
        if let SfuRequest::Leave { .. } = req {
            if let Some(tx) = self.peers.remove(&peer) {
                let _ = tx.send(req);
            }
            return;
        }
        let tx = self.peers.entry(peer.clone()).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(peer_task(self.handle.clone(), self.router.clone(), peer, rx));
            tx
        });
        let _ = tx.send(req);
    }
}

fn deliver(router: &Router, peer: &str, frame: String) {
    if let Some(r) = router.upgrade() {
        r.sfu_frame(peer, frame);
    }
}

fn refusal(e: &SfuNetError, ty: &str) -> String {
    ProtocolError::new(ErrorCode::BadField, format!("the SFU refused this {ty}: {e}")).refers_to(ty).to_json()
}

async fn new_session(handle: &SfuHandle, router: &Router, room: &str, peer: &Arc<str>) -> Option<SessionId> {
    let (id, mut signals) = match handle.add_session(room, peer).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("SFU session for {peer}: {e}");
            return None;
        }
    };
    let (router, peer) = (router.clone(), peer.clone());
    tokio::spawn(async move {
        while let Some(s) = signals.recv().await {
            match s {
                SessionSignal::Offer { sdp, tracks } => {
                    let tracks: Vec<SfuTrack> = tracks
                        .into_iter()
                        .map(|t| SfuTrack {
                            mid: t.mid,
                            peer: t.participant.to_string(),
                            kind: t.kind.to_string().to_lowercase(),
                            peer_mid: t.origin_mid,
                        })
                        .collect();
                    deliver(&router, &peer, encode_sfu_offer(&sdp, &tracks));
                }
                SessionSignal::Answer { sdp } => deliver(&router, &peer, encode_sfu_answer(&sdp)),
                SessionSignal::Connected => tracing::debug!("SFU session of {peer} connected"),
                SessionSignal::ActiveSpeaker { participant } => deliver(&router, &peer, encode_speaker(&participant)),
                SessionSignal::Closed => tracing::info!("SFU session of {peer} closed (ICE/DTLS)"),
            }
        }
    });
    Some(id)
}

async fn peer_task(handle: SfuHandle, router: Router, peer: Arc<str>, mut rx: mpsc::UnboundedReceiver<SfuRequest>) {
    let mut session: Option<SessionId> = None;
    while let Some(req) = rx.recv().await {
        let (room, kind, payload) = match req {
            SfuRequest::Signal { room, kind, payload, .. } => (room, kind, payload),
            SfuRequest::View { tracks, .. } => {
                // Before the first offer there is nothing to show yet.
                if let Some(id) = session {
                    let views = tracks
                        .into_iter()
                        .map(|t| (t.mid, webcall_sfu::View { width: t.width, height: t.height }))
                        .collect();
                    let _ = handle.view(id, views);
                }
                continue;
            }
            SfuRequest::Leave { .. } => break,
            SfuRequest::Record { .. } => continue,
        };
        if session.is_none() {
            session = new_session(&handle, &router, &room, &peer).await;
        }
        let Some(id) = session else { continue };
        match kind {
            RelayKind::Offer | RelayKind::Answer => {
                let Ok(sdp) = serde_json::from_str::<String>(&payload) else { continue };
                // Answers reach the client through the session's signals (in order with server offers).
                let mut res = if kind == RelayKind::Offer {
                    handle.offer(id, sdp.clone()).await.map(|_| ())
                } else {
                    handle.answer(id, sdp.clone()).await
                };
                // The media session died (ICE/DTLS); a new offer starts a new one.
                if kind == RelayKind::Offer && matches!(res, Err(SfuNetError::Sfu(SfuError::UnknownSession(_)))) {
                    session = new_session(&handle, &router, &room, &peer).await;
                    if let Some(id) = session {
                        res = handle.offer(id, sdp).await.map(|_| ());
                    }
                }
                if let Err(e) = res {
                    deliver(&router, &peer, refusal(&e, kind.as_str()));
                }
            }
            RelayKind::Candidate => {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&payload) else { continue };
                if let Some(line) = v.get("candidate").and_then(|c| c.as_str()) {
                    let _ = handle.candidate(id, line.to_owned());
                }
            }
        }
    }
    if let Some(id) = session {
        let _ = handle.remove(id);
    }
}
