//! The thin tokio adapter: one task owns the media UDP socket and the [`Sfu`] core; signaling talks to it
//! through [`SfuHandle`].
//!
//! Plain `tokio::net::UdpSocket` (one datagram per syscall) for now; batched I/O with `quinn-udp` is the next
//! step (issue 14).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use str0m::config::DtlsCert;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};

use crate::core::{Caps, SessionId, Sfu, SfuConfig, SfuError, SfuEvent, SfuOutput, SfuStats, TrackInfo, View};

/// Where the media socket listens and what address it advertises.
#[derive(Debug, Clone)]
pub struct MediaConfig {
    /// `--media-listen` (default `127.0.0.1:7882`).
    pub listen: SocketAddr,
    /// `--media-external-ip`: the address clients reach the socket at, when it differs (NAT).
    pub external_ip: Option<IpAddr>,
    pub dtls_cert: Option<DtlsCert>,
    /// Track and bitrate caps (`--max-sfu-tracks` and friends).
    pub caps: Caps,
}

#[derive(Debug, thiserror::Error)]
pub enum SfuNetError {
    #[error("cannot bind the SFU media socket {addr}: {source} (pick another --media-listen)")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error(
        "--media-listen {0} is a wildcard address, which cannot be advertised to clients; set --media-external-ip"
    )]
    Unadvertisable(SocketAddr),
    #[error("the SFU task has stopped")]
    Stopped,
    #[error(transparent)]
    Sfu(#[from] SfuError),
}

/// What the SFU tells the signaling side of one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionSignal {
    /// The answer to the client's offer (also returned by [`SfuHandle::offer`]); it comes on this channel too so
    /// that it reaches the client before any server offer that follows it.
    Answer {
        sdp: String,
    },
    /// Send this offer to the client; `tracks` maps its receive m-lines to publishers.
    Offer {
        sdp: String,
        tracks: Vec<TrackInfo>,
    },
    Connected,
    /// The room's active speaker changed to this participant.
    ActiveSpeaker {
        participant: Arc<str>,
    },
    /// The media session died (ICE or DTLS failed); the client may join again.
    Closed,
}

enum Command {
    Add {
        room: String,
        participant: String,
        signals: mpsc::UnboundedSender<SessionSignal>,
        reply: oneshot::Sender<SessionId>,
    },
    Offer {
        id: SessionId,
        sdp: String,
        reply: oneshot::Sender<Result<Option<String>, SfuError>>,
    },
    Answer {
        id: SessionId,
        sdp: String,
        reply: oneshot::Sender<Result<(), SfuError>>,
    },
    Candidate {
        id: SessionId,
        line: String,
    },
    Remove {
        id: SessionId,
    },
    View {
        id: SessionId,
        views: Vec<(String, View)>,
    },
}

/// A handle to the running SFU; cheap to clone. The task stops when the last handle is dropped.
#[derive(Clone)]
pub struct SfuHandle {
    tx: mpsc::UnboundedSender<Command>,
    local_addr: SocketAddr,
    stats: Arc<Mutex<SfuStats>>,
}

impl SfuHandle {
    /// Binds the media socket and starts the SFU task.
    pub async fn start(cfg: MediaConfig) -> Result<SfuHandle, SfuNetError> {
        let socket =
            UdpSocket::bind(cfg.listen).await.map_err(|source| SfuNetError::Bind { addr: cfg.listen, source })?;
        let local_addr = socket.local_addr().map_err(|source| SfuNetError::Bind { addr: cfg.listen, source })?;
        let advertised = match cfg.external_ip {
            Some(ip) => SocketAddr::new(ip, local_addr.port()),
            None if local_addr.ip().is_unspecified() => return Err(SfuNetError::Unadvertisable(local_addr)),
            None => local_addr,
        };
        // One certificate for every session, made off the runtime (its first use seeds aws-lc's entropy: slow).
        let dtls_cert = match cfg.dtls_cert {
            Some(c) => Some(c),
            None => {
                tokio::task::spawn_blocking(|| str0m::crypto::from_feature_flags().dtls_provider.generate_certificate())
                    .await
                    .ok()
                    .flatten()
            }
        };
        let sfu = Sfu::new(
            SfuConfig { host_candidates: vec![advertised], dtls_cert, caps: cfg.caps, follow_bwe: true },
            Instant::now(),
        );
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(Mutex::new(SfuStats::default()));
        tokio::spawn(run(socket, local_addr, sfu, rx, stats.clone()));
        Ok(SfuHandle { tx, local_addr, stats })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The figures as of the SFU task's last turn.
    pub fn stats(&self) -> SfuStats {
        *self.stats.lock()
    }

    /// A new session; its signals (server offers, close) come on the returned receiver.
    pub async fn add_session(
        &self,
        room: &str,
        participant: &str,
    ) -> Result<(SessionId, mpsc::UnboundedReceiver<SessionSignal>), SfuNetError> {
        let (signals, rx) = mpsc::unbounded_channel();
        let (reply, id) = oneshot::channel();
        self.send(Command::Add { room: room.into(), participant: participant.into(), signals, reply })?;
        Ok((id.await.map_err(|_| SfuNetError::Stopped)?, rx))
    }

    /// The client's offer; `None` when the server's own outstanding offer wins (see [`Sfu::accept_offer`]).
    pub async fn offer(&self, id: SessionId, sdp: String) -> Result<Option<String>, SfuNetError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Offer { id, sdp, reply })?;
        Ok(rx.await.map_err(|_| SfuNetError::Stopped)??)
    }

    pub async fn answer(&self, id: SessionId, sdp: String) -> Result<(), SfuNetError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Answer { id, sdp, reply })?;
        Ok(rx.await.map_err(|_| SfuNetError::Stopped)??)
    }

    pub fn candidate(&self, id: SessionId, line: String) -> Result<(), SfuNetError> {
        self.send(Command::Candidate { id, line })
    }

    /// How the client shows the video of its receive m-lines (`mid`, size; 0×0 hidden).
    pub fn view(&self, id: SessionId, views: Vec<(String, View)>) -> Result<(), SfuNetError> {
        self.send(Command::View { id, views })
    }

    pub fn remove(&self, id: SessionId) -> Result<(), SfuNetError> {
        self.send(Command::Remove { id })
    }

    fn send(&self, c: Command) -> Result<(), SfuNetError> {
        self.tx.send(c).map_err(|_| SfuNetError::Stopped)
    }
}

async fn run(
    socket: UdpSocket,
    local: SocketAddr,
    mut sfu: Sfu,
    mut rx: mpsc::UnboundedReceiver<Command>,
    stats: Arc<Mutex<SfuStats>>,
) {
    let mut signals: HashMap<SessionId, mpsc::UnboundedSender<SessionSignal>> = HashMap::new();
    let mut buf = vec![0u8; 2048];
    loop {
        let deadline = loop {
            match sfu.poll_output() {
                SfuOutput::Transmit(t) => {
                    if let Err(e) = socket.send_to(&t.contents, t.destination).await {
                        tracing::debug!("SFU send to {} failed: {e}", t.destination);
                    }
                }
                SfuOutput::Event(e) => {
                    let (id, signal) = match e {
                        SfuEvent::Offer { session, sdp, tracks } => (session, SessionSignal::Offer { sdp, tracks }),
                        SfuEvent::Connected { session } => (session, SessionSignal::Connected),
                        SfuEvent::Closed { session } => (session, SessionSignal::Closed),
                        SfuEvent::ActiveSpeaker { session, participant } => {
                            (session, SessionSignal::ActiveSpeaker { participant })
                        }
                    };
                    let gone = signal == SessionSignal::Closed;
                    if let Some(tx) = signals.get(&id) {
                        let _ = tx.send(signal);
                    }
                    if gone {
                        signals.remove(&id);
                    }
                }
                SfuOutput::Timeout(t) => break t,
            }
        };
        *stats.lock() = sfu.stats();
        tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok((n, source)) => sfu.handle_receive(Instant::now(), source, local, &buf[..n]),
                // ICMP errors (port unreachable) surface here on Linux; they concern one peer only.
                Err(e) => tracing::debug!("SFU receive: {e}"),
            },
            c = rx.recv() => match c {
                None => return,
                Some(Command::Add { room, participant, signals: tx, reply }) => {
                    let id = sfu.add_session(&room, &participant, Instant::now());
                    signals.insert(id, tx);
                    let _ = reply.send(id);
                }
                Some(Command::Offer { id, sdp, reply }) => {
                    let res = sfu.accept_offer(id, &sdp);
                    if let (Ok(Some(answer)), Some(tx)) = (&res, signals.get(&id)) {
                        let _ = tx.send(SessionSignal::Answer { sdp: answer.clone() });
                    }
                    let _ = reply.send(res);
                }
                Some(Command::Answer { id, sdp, reply }) => {
                    let _ = reply.send(sfu.accept_answer(id, &sdp));
                }
                Some(Command::Candidate { id, line }) => {
                    if let Err(e) = sfu.add_candidate(id, &line) {
                        tracing::debug!("SFU session {id}: candidate ignored: {e}");
                    }
                }
                Some(Command::View { id, views }) => {
                    for (mid, view) in views {
                        if let Err(e) = sfu.set_view(id, &mid, view) {
                            tracing::debug!("SFU session {id}: view ignored: {e}");
                        }
                    }
                }
                Some(Command::Remove { id }) => {
                    sfu.remove_session(id);
                    signals.remove(&id);
                }
            },
            _ = tokio::time::sleep_until(deadline.into()) => sfu.handle_timeout(Instant::now()),
        }
    }
}
