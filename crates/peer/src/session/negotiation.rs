//! Perfect negotiation with one remote peer: offers and answers (the smaller id is polite), trickled candidates
//! both ways, and our own candidates as the gatherer finds them.

use std::time::Instant;

use str0m::change::{SdpAnswer, SdpOffer};
use str0m::channel::ChannelConfig;
use str0m::media::{Direction, MediaKind, Mid};
use str0m::Candidate;
use webcall_protocol::{IceCandidate, Signal};

use super::Session;
use crate::gather::GatherEvent;
use crate::out;

impl Session {
    /// An offer or answer went out (it carries every candidate gathered so far): from now on new candidates
    /// are trickled, and end-of-candidates follows once gathering is over.
    pub(super) fn sdp_sent(&mut self, sdp: &str) {
        self.sdp_sent = true;
        if let Some(mid) = sdp.lines().find_map(|l| l.strip_prefix("a=mid:")) {
            self.first_mid = Some(mid.trim().to_owned());
        }
        if self.gather.is_done() {
            self.send(Signal::Candidate(None));
        }
    }

    /// Sends what the gatherer queued and takes in the candidates it found.
    pub(super) fn flush_gather(&mut self) {
        while let Some((local, to, data)) = self.gather.poll_transmit() {
            if let Some(sock) = self.sockets.get(&local) {
                let _ = sock.try_send_to(&data, to);
            }
        }
        while let Some(e) = self.gather.poll_event() {
            match e {
                GatherEvent::Candidate(c) => {
                    let (addr, kind) = (c.addr(), c.kind());
                    self.kinds.insert(addr, kind);
                    let Some(added) = self.rtc.add_local_candidate(c) else {
                        tracing::debug!("peer {}: {kind} candidate {addr} not added (redundant)", self.cfg.remote_id);
                        continue;
                    };
                    let line = added.to_sdp_string();
                    let ms = self.gather.started().elapsed().as_millis();
                    out(format!("peer {} local candidate {kind} {addr} after {ms} ms", self.cfg.remote_id));
                    if self.sdp_sent {
                        let c = IceCandidate {
                            candidate: line,
                            sdp_mid: self.first_mid.clone(),
                            sdp_m_line_index: Some(0),
                            username_fragment: None,
                        };
                        self.send(Signal::Candidate(Some(c)));
                    }
                }
                GatherEvent::Done => {
                    let ms = self.gather.started().elapsed().as_millis();
                    out(format!("peer {} gathering complete in {ms} ms", self.cfg.remote_id));
                    if self.sdp_sent {
                        self.send(Signal::Candidate(None));
                    }
                }
            }
        }
    }

    /// Makes an offer with whatever is missing (video, audio, chat channel) or an ICE restart.
    pub(super) fn offer(&mut self, ice_restart: bool) {
        if self.pending.is_some() {
            return;
        }
        let mut change = self.rtc.sdp_api();
        if self.video_mids.is_empty() {
            let mid = change.add_media(MediaKind::Video, Direction::SendRecv, None, None, None);
            self.video_mids.push(mid);
        }
        if self.audio_mids.is_empty() {
            let mid = change.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
            self.audio_mids.push(mid);
        }
        if self.chat_channel.is_none() && !self.have_remote_description {
            self.chat_channel = Some(change.add_channel_with_config(chat_channel_config()));
        }
        if ice_restart {
            change.ice_restart(true);
        }
        if let Some((offer, pending)) = change.apply() {
            self.pending = Some(pending);
            let sdp = offer.to_sdp_string();
            self.send(Signal::Offer(sdp.clone()));
            self.sdp_sent(&sdp);
        }
    }

    /// Remembers the kinds of the candidates inside a remote SDP (for the selected-pair line).
    pub(super) fn learn_sdp_candidates(&mut self, sdp: &str) {
        for line in sdp.lines().filter_map(|l| l.strip_prefix("a=")) {
            if let Ok(c) = Candidate::from_sdp_string(line.trim()) {
                self.kinds.insert(c.addr(), c.kind());
                self.gather.add_remote_ip(c.addr().ip(), Instant::now());
            }
        }
    }

    /// The m-lines an accepted offer created, known now rather than at their `MediaAdded` events (a re-offer made
    /// right away must not add a second video or audio line).
    pub(super) fn learn_offered_media(&mut self, sdp: &str) {
        let mut kind = None;
        for line in sdp.lines().map(str::trim) {
            if let Some(m) = line.strip_prefix("m=") {
                kind = m.split_whitespace().next().map(str::to_owned);
            } else if let Some(mid) = line.strip_prefix("a=mid:") {
                let mid = Mid::from(mid);
                let mids = match kind.as_deref() {
                    Some("video") => &mut self.video_mids,
                    Some("audio") => &mut self.audio_mids,
                    _ => continue,
                };
                if self.rtc.media(mid).is_some() && !mids.contains(&mid) {
                    mids.push(mid);
                }
            }
        }
    }

    pub(super) fn on_offer(&mut self, sdp: &str) {
        self.learn_sdp_candidates(sdp);
        let offer = match SdpOffer::from_sdp_string(sdp) {
            Ok(o) => o,
            Err(e) => return tracing::warn!("peer {}: unreadable offer: {e}", self.cfg.remote_id),
        };
        // Perfect negotiation: on a collision the impolite side ignores the remote offer; the polite side
        // lets it win (accept_offer rolls back our pending offer).
        if self.pending.is_some() && !self.cfg.polite {
            tracing::info!("peer {}: offer collision, ignoring theirs (we are impolite)", self.cfg.remote_id);
            return;
        }
        let rolled_back = self.pending.take().is_some();
        if rolled_back {
            // Our un-negotiated m-lines and channel are gone with the rollback.
            self.video_mids.retain(|m| self.rtc.media(*m).is_some());
            self.audio_mids.retain(|m| self.rtc.media(*m).is_some());
            if !self.chat_open {
                self.chat_channel = None;
            }
        }
        if self.chat_channel.is_none() {
            // The browser's chat channel is pre-negotiated (id 0): declare ours before answering.
            self.chat_channel = Some(self.rtc.direct_api().create_data_channel(chat_channel_config()));
        }
        match self.rtc.sdp_api().accept_offer(offer) {
            Ok(answer) => {
                self.have_remote_description = true;
                let answer = answer.to_sdp_string();
                self.send(Signal::Answer(answer.clone()));
                self.sdp_sent(&answer);
                self.flush_candidates();
                self.learn_offered_media(sdp);
                // Ours were rolled back: offer what the remote offer did not bring.
                if rolled_back && (self.video_mids.is_empty() || self.audio_mids.is_empty()) {
                    self.offer(false);
                }
            }
            Err(e) => tracing::warn!("peer {}: offer refused: {e}", self.cfg.remote_id),
        }
    }

    pub(super) fn on_answer(&mut self, sdp: &str) {
        self.learn_sdp_candidates(sdp);
        let Some(pending) = self.pending.take() else {
            return tracing::debug!("peer {}: answer without an offer; ignored", self.cfg.remote_id);
        };
        let answer = match SdpAnswer::from_sdp_string(sdp) {
            Ok(a) => a,
            Err(e) => return tracing::warn!("peer {}: unreadable answer: {e}", self.cfg.remote_id),
        };
        match self.rtc.sdp_api().accept_answer(pending, answer) {
            Ok(()) => {
                self.have_remote_description = true;
                self.flush_candidates();
            }
            Err(e) => tracing::warn!("peer {}: answer refused: {e}", self.cfg.remote_id),
        }
    }

    pub(super) fn on_candidate(&mut self, c: Option<IceCandidate>) {
        let Some(c) = c else { return };
        let line = c.candidate.as_str();
        if line.is_empty() {
            return; // Some browsers signal end-of-candidates this way.
        }
        match Candidate::from_sdp_string(line) {
            Ok(cand) => {
                self.kinds.insert(cand.addr(), cand.kind());
                self.gather.add_remote_ip(cand.addr().ip(), Instant::now());
                if self.have_remote_description {
                    self.rtc.add_remote_candidate(cand);
                } else {
                    self.buffered_candidates.push(cand);
                }
            }
            // mDNS (.local) and TCP candidates from browsers are not usable here.
            Err(e) => tracing::debug!("peer {}: skipping candidate {line:?}: {e}", self.cfg.remote_id),
        }
    }

    pub(super) fn flush_candidates(&mut self) {
        for c in std::mem::take(&mut self.buffered_candidates) {
            self.rtc.add_remote_candidate(c);
        }
    }
}

/// The chat channel as the browser client declares it: label `chat`, negotiated out of band as SCTP stream 0.
fn chat_channel_config() -> ChannelConfig {
    ChannelConfig { label: "chat".into(), ordered: true, negotiated: Some(0), ..Default::default() }
}
