//! The controller: one [`Session`] per remote peer, started and stopped as signaling says, with the stats lines
//! and the exit code over every session it ever ran.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::mpsc;
use webcall_protocol::Signal;

use crate::session::{Report, Session, SessionConfig, ToSession};
use crate::{exit, gather, media::SourceHandle, out, sfu, PeerArgs, PeerError};

pub(crate) struct Peer {
    pub tx: mpsc::UnboundedSender<ToSession>,
    pub report: Arc<Mutex<Report>>,
}

pub(crate) struct Controller {
    pub args: PeerArgs,
    pub ips: Vec<IpAddr>,
    pub source: Option<SourceHandle>,
    /// From the last welcome.
    pub my_id: Option<String>,
    pub peers: HashMap<String, Peer>,
    pub names: HashMap<String, String>,
    /// Every session ever started (rejoins make new ones), for the exit code and the final stats.
    pub reports: Vec<Arc<Mutex<Report>>>,
    pub signal_tx: mpsc::UnboundedSender<(String, Signal)>,
    /// From the last welcome.
    pub ice: gather::IceConfig,
    /// Welcomed at least once.
    pub joined: bool,
    /// The session with the server's SFU, once the room went there (`--sfu`).
    pub sfu: Option<sfu::SfuPeer>,
}

impl Controller {
    pub fn start_session(&mut self, remote: &str, offerer: bool) {
        if let Some(old) = self.peers.remove(remote) {
            let _ = old.tx.send(ToSession::Close);
        }
        let my_id = self.my_id.clone().unwrap_or_default();
        let name = self.names.get(remote).cloned().unwrap_or_default();
        let report = Arc::new(Mutex::new(Report { id: remote.to_owned(), name: name.clone(), ..Default::default() }));
        let cfg = SessionConfig {
            my_name: self.args.name.clone(),
            remote_id: remote.to_owned(),
            remote_name: name,
            offerer,
            polite: my_id.as_str() < remote,
            local_ips: self.ips.clone(),
            source: self.source.clone(),
            record_dir: self.args.record.clone(),
            echo: self.args.echo,
            chat: self.args.chat,
            ice: self.ice.clone(),
            signal: self.signal_tx.clone(),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let r = report.clone();
        tokio::spawn(async move {
            match Session::start(cfg, r.clone()).await {
                Ok((s, udp, readers)) => s.run(rx, udp, readers).await,
                Err(e) => {
                    tracing::error!("{e}");
                    r.lock().unwrap().closed = true;
                }
            }
        });
        self.reports.push(report.clone());
        self.peers.insert(remote.to_owned(), Peer { tx, report });
    }

    pub fn to_peer(&self, id: &str, m: ToSession) {
        if let Some(p) = self.peers.get(id) {
            let _ = p.tx.send(m);
        }
    }

    pub fn close_all(&mut self) {
        for (_, p) in self.peers.drain() {
            let _ = p.tx.send(ToSession::Close);
        }
    }

    /// The room went to the SFU: one session with the server (peer-to-peer sessions close once it is up).
    pub async fn start_sfu(&mut self) -> Result<(), PeerError> {
        if self.sfu.is_some() {
            return Ok(());
        }
        out("room media goes through the sfu");
        let cfg = sfu::SfuSessionConfig {
            local_ips: self.ips.clone(),
            source: self.source.clone(),
            record_dir: self.args.record.clone(),
            count_only: self.args.count_only,
            offer_first: true,
            names: self.names.clone(),
            signal: self.signal_tx.clone(),
        };
        self.sfu = Some(sfu::start(cfg).await?);
        Ok(())
    }

    pub fn close_sfu(&mut self) {
        if let Some(s) = self.sfu.take() {
            s.send(sfu::ToSfu::Close);
            self.reports.extend(s.reports());
        }
    }

    pub fn print_stats(&self, final_: bool) {
        let now = Instant::now();
        let mut list: Vec<_> =
            if final_ { self.reports.clone() } else { self.peers.values().map(|p| p.report.clone()).collect() };
        if let Some(s) = &self.sfu {
            list.extend(s.reports());
            out(s.stats_line(final_));
        }
        for r in list {
            let mut r = r.lock().unwrap();
            let kbps = match r.last_at {
                Some(t) if now > t => (r.bytes_in - r.last_bytes_in) as f64 * 8.0 / 1000.0 / (now - t).as_secs_f64(),
                _ => 0.0,
            };
            if !final_ {
                r.last_at = Some(now);
                r.last_bytes_in = r.bytes_in;
            }
            out(format!(
                "stats{} peer={} name={:?} ice={} connected={} pair={:?} frames_in={} keyframes_in={} bytes_in={} kbps_in={:.0} frames_out={} bytes_out={} chat_in={} audio_in={} audio_out={}{}",
                if final_ { " final" } else { "" },
                r.id,
                r.name,
                if r.ice.is_empty() { "new" } else { &r.ice },
                r.connected,
                r.pair.as_deref().unwrap_or("none"),
                r.frames_in,
                r.keyframes_in,
                r.bytes_in,
                kbps,
                r.frames_out,
                r.bytes_out,
                r.chat_in,
                r.audio_in,
                r.audio_out,
                r.recording.as_ref().map(|p| format!(" recording={}", p.display())).unwrap_or_default(),
            ));
        }
    }

    pub fn exit_code(&self) -> i32 {
        if !self.joined {
            return exit::SIGNALING;
        }
        let mut all = self.reports.clone();
        all.extend(self.sfu.iter().flat_map(|s| s.reports()));
        let reports: Vec<Report> = all.iter().map(|r| r.lock().unwrap().clone()).collect();
        let mut connected: Vec<&str> = reports.iter().filter(|r| r.connected).map(|r| r.id.as_str()).collect();
        connected.sort_unstable();
        connected.dedup();
        let present_unconnected = self.peers.values().any(|p| !p.report.lock().unwrap().connected);
        if connected.len() < self.args.expect || present_unconnected {
            return exit::NOT_CONNECTED;
        }
        let want_in = self.args.record.is_some() || self.args.echo;
        let want_out = self.args.send.is_some();
        for r in reports.iter().filter(|r| r.connected) {
            if (want_in && r.frames_in == 0) || (want_out && r.frames_out == 0) {
                return exit::NO_MEDIA;
            }
        }
        exit::OK
    }
}
