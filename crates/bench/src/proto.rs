//! Dialing, joining and the relayed message format, for both protocols.

use crate::{Common, Target};
use anyhow::{anyhow, bail, Context};
use futures_util::{SinkExt, StreamExt};
use serde_json::value::RawValue;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use webcall_protocol::{encode_relay, Event, Join, RelayKind, ServerMessage, Signal, SignalingClient};

pub type Ws = WebSocketStream<TcpStream>;

/// How long one connection may take to open and join before the run is abandoned.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(20);

/// Where to connect, and how.
pub struct Endpoint {
    pub target: Target,
    url: String,
    addr: SocketAddr,
    sources: u8,
}

impl Endpoint {
    pub async fn new(c: &Common) -> anyhow::Result<Endpoint> {
        Self::at(c, &c.url).await
    }

    /// Like [`Endpoint::new`] but at `url` (another node of the same cluster, say).
    pub async fn at(c: &Common, url: &str) -> anyhow::Result<Endpoint> {
        let rest = url.strip_prefix("ws://").ok_or_else(|| anyhow!("the URL must be a ws:// URL, got {url}"))?;
        let hostport = rest.split(['/', '?']).next().unwrap_or(rest);
        let addr = tokio::net::lookup_host(hostport)
            .await
            .with_context(|| format!("resolving {hostport}"))?
            .next()
            .ok_or_else(|| anyhow!("{hostport} resolves to nothing"))?;
        if !addr.ip().is_loopback() {
            bail!("webcall bench only dials loopback addresses, not {addr}");
        }
        let url = url.split('?').next().unwrap_or(url).to_owned();
        Ok(Endpoint { target: c.target, url, addr, sources: c.sources.max(1) })
    }

    /// Opens WebSocket number `n` (its source address rotates over `--sources`), with `query` appended.
    pub async fn dial(&self, n: usize, query: Option<&str>) -> anyhow::Result<Ws> {
        let sock = match self.addr.ip() {
            IpAddr::V4(_) => {
                let s = TcpSocket::new_v4()?;
                if self.sources > 1 {
                    let last = 1 + (n % self.sources as usize) as u8;
                    s.bind(SocketAddr::new(Ipv4Addr::new(127, 0, 0, last).into(), 0))?;
                }
                s
            }
            IpAddr::V6(_) => TcpSocket::new_v6()?,
        };
        let stream = sock.connect(self.addr).await.with_context(|| format!("connecting to {}", self.addr))?;
        stream.set_nodelay(true)?;
        let url = match query {
            Some(q) => format!("{}?{q}", self.url),
            None => self.url.clone(),
        };
        // Small buffers: the generator holds as many connections as the server.
        let cfg = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
        let (ws, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(cfg)).await?;
        Ok(ws)
    }

    /// webcall: connect and join `room` through the protocol's [`SignalingClient`]; the peer id the `welcome` gave.
    /// (The relay's load itself is pre-encoded frames, see [`Template`], so the generator stays cheap.)
    pub async fn webcall_join(&self, n: usize, room: &str) -> anyhow::Result<(Ws, String)> {
        let mut ws = self.dial(n, None).await?;
        let mut client = SignalingClient::new(Join::new(room.to_owned(), format!("bench{n}")));
        ws.send(Message::text(client.connected())).await?;
        loop {
            match client.receive(&next_text(&mut ws).await?)? {
                Event::Welcome { id, .. } => return Ok((ws, id)),
                Event::Error { code, message, .. } => bail!("refused by the server: {code}: {message}"),
                _ => continue,
            }
        }
    }

    /// PeerJS: connect as `id` and wait for `OPEN`.
    pub async fn peerjs_open(&self, n: usize, id: &str) -> anyhow::Result<Ws> {
        let mut ws = self.dial(n, Some(&format!("key=peerjs&id={id}&token=t{n}"))).await?;
        peerjs_expect(&mut ws, "OPEN").await?;
        Ok(ws)
    }
}

/// The next text frame (pings are answered by tungstenite itself).
pub async fn next_text(ws: &mut Ws) -> anyhow::Result<String> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => return Ok(t.as_str().to_owned()),
            Some(Ok(Message::Close(f))) => bail!("closed by the server: {f:?}"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => bail!("connection ended"),
        }
    }
}

/// webcall: the next server message, typed; an `error` fails.
pub async fn next_message(ws: &mut Ws) -> anyhow::Result<ServerMessage> {
    let t = next_text(ws).await?;
    match ServerMessage::parse(&t).with_context(|| format!("not a webcall server message: {t}"))? {
        ServerMessage::Error { code, message, .. } => bail!("refused by the server: {code}: {message}"),
        m => Ok(m),
    }
}

/// PeerJS (untyped: not our protocol): reads until a message of type `ty`; `ERROR`/`ID-TAKEN` fails.
pub async fn peerjs_expect(ws: &mut Ws, ty: &str) -> anyhow::Result<serde_json::Value> {
    loop {
        let t = next_text(ws).await?;
        let v: serde_json::Value = serde_json::from_str(&t).with_context(|| format!("not JSON: {t}"))?;
        match v["type"].as_str() {
            Some(x) if x == ty => return Ok(v),
            Some("ERROR" | "ID-TAKEN") => bail!("refused while waiting for {ty}: {t}"),
            _ => continue,
        }
    }
}

/// Offer or answer.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Offer,
    Answer,
}

impl Kind {
    fn relay(self) -> RelayKind {
        match self {
            Kind::Offer => RelayKind::Offer,
            Kind::Answer => RelayKind::Answer,
        }
    }
}

/// A relayed message with room for a send timestamp inside its SDP, padded to `size` bytes of SDP.
pub struct Template {
    prefix: String,
    suffix: String,
}

const TS_DIGITS: usize = 20;
/// Stands for the timestamp while a frame is encoded once, to be cut into the template's two halves.
const MARK: &str = "<stamp>";

/// `frame` cut at [`MARK`] (its last occurrence: nothing after the SDP's start can contain it).
fn split_at_mark(frame: &str) -> (String, String) {
    let at = frame.rfind(MARK).expect("the frame holds the mark");
    (frame[..at].to_owned(), frame[at + MARK.len()..].to_owned())
}

impl Template {
    pub fn new(target: Target, kind: Kind, to: &str, size: usize) -> Template {
        let pad = "x".repeat(size.saturating_sub(TS_DIGITS + 1));
        let (prefix, suffix) = match target {
            // Encoded once by the protocol's typed encoder; each message is then two copies and the stamp.
            Target::Webcall => {
                let sdp = format!("{MARK}:{pad}");
                let signal = match kind {
                    Kind::Offer => Signal::Offer(sdp),
                    Kind::Answer => Signal::Answer(sdp),
                };
                split_at_mark(&signal.to_json(to))
            }
            // What PeerJS's client sends for a media connection, minus the fields that do not change the size.
            Target::Peerjs => {
                let (lower, upper) = match kind {
                    Kind::Offer => ("offer", "OFFER"),
                    Kind::Answer => ("answer", "ANSWER"),
                };
                (
                    format!(
                        r#"{{"type":"{upper}","dst":"{to}","payload":{{"type":"media","connectionId":"mc_bench","sdp":{{"type":"{lower}","sdp":""#
                    ),
                    format!(r#":{pad}"}}}}}}"#),
                )
            }
        };
        Template { prefix, suffix }
    }

    /// The message stamped with `ts` (nanoseconds on the generator's clock).
    pub fn render(&self, ts: u64) -> String {
        let mut s = String::with_capacity(self.prefix.len() + TS_DIGITS + self.suffix.len());
        s.push_str(&self.prefix);
        s.push_str(&format!("{ts:0TS_DIGITS$}"));
        s.push_str(&self.suffix);
        s
    }
}

fn stamp_in(sdp: &str) -> Option<u64> {
    sdp.get(..TS_DIGITS)?.parse().ok()
}

/// What a client reads from the server during a relay run.
pub enum Received {
    /// A relayed message and the timestamp inside it.
    Stamped(u64),
    /// Anything else that is not a refusal (webcall: `hello`, `bye`, …).
    Other,
}

/// Reads the relayed messages one peer receives from another, with the stamp their sender put in.
pub enum Reader {
    /// webcall: the start of the frame the server relays from that peer, as the protocol's encoder writes it
    /// (up to the SDP's first character); a frame that starts otherwise is read with the typed parser.
    Webcall { prefix: String },
    /// PeerJS (untyped: not our protocol): the stamp after the first `"sdp":"`.
    Peerjs,
}

impl Reader {
    /// For messages of `kind` relayed from peer `from`.
    pub fn new(target: Target, kind: Kind, from: &str) -> Reader {
        match target {
            Target::Webcall => {
                let mark = RawValue::from_string(format!("\"{MARK}\"")).expect("a JSON string");
                let (prefix, _) = split_at_mark(&encode_relay(kind.relay(), from, &mark));
                Reader::Webcall { prefix }
            }
            Target::Peerjs => Reader::Peerjs,
        }
    }

    /// One text frame; a refusal by the server is an error.
    pub fn read(&self, text: &str) -> anyhow::Result<Received> {
        match self {
            Reader::Webcall { prefix } => {
                // The common case, as cheap as finding the stamp: the frame is the one the relay writes.
                if let Some(ts) = text.strip_prefix(prefix.as_str()).and_then(stamp_in) {
                    return Ok(Received::Stamped(ts));
                }
                match ServerMessage::parse(text).with_context(|| format!("not a webcall server message: {text}"))? {
                    ServerMessage::Offer { sdp, .. } | ServerMessage::Answer { sdp, .. } => {
                        Ok(stamp_in(&sdp).map_or(Received::Other, Received::Stamped))
                    }
                    ServerMessage::Error { code, message, .. } => {
                        bail!("the server refused a message: {code}: {message}")
                    }
                    _ => Ok(Received::Other),
                }
            }
            Reader::Peerjs => {
                let stamp = text.find(r#""sdp":""#).and_then(|at| stamp_in(text.get(at + 7..)?));
                match stamp {
                    Some(ts) => Ok(Received::Stamped(ts)),
                    None if text.contains(r#""type":"ERROR""#) => bail!("the server refused a message: {text}"),
                    None => Ok(Received::Other),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use webcall_protocol::{parse_client, ClientMessage};

    #[test]
    fn templates_round_trip() {
        for target in [Target::Webcall, Target::Peerjs] {
            let t = Template::new(target, Kind::Offer, "abc", 1024);
            let m = t.render(123_456_789);
            let v: serde_json::Value = serde_json::from_str(&m).unwrap();
            let sdp = match target {
                Target::Webcall => v["sdp"].as_str().unwrap().to_owned(),
                Target::Peerjs => v["payload"]["sdp"]["sdp"].as_str().unwrap().to_owned(),
            };
            assert_eq!(sdp.len(), 1024);
        }
        // As relayed: PeerJS appends `src`.
        let peerjs = Reader::new(Target::Peerjs, Kind::Offer, "x");
        let relayed =
            Template::new(Target::Peerjs, Kind::Offer, "abc", 64).render(42).replace("}}}", r#"}},"src":"x"}"#);
        assert!(matches!(peerjs.read(&relayed), Ok(Received::Stamped(42))), "{relayed}");
    }

    #[test]
    fn webcall_messages_are_the_protocols_and_read_back_as_the_server_relays_them() {
        for kind in [Kind::Offer, Kind::Answer] {
            let m = Template::new(Target::Webcall, kind, "Yx3kq0tVb2", 1024).render(123_456_789);
            let Ok(ClientMessage::Relay(r)) = parse_client(&m) else { panic!("{m}") };
            assert_eq!((r.kind, &*r.to), (kind.relay(), "Yx3kq0tVb2"));
            // What the server writes for it, read by the fast path.
            let relayed = r.encode_from("P7dLw1zQe9");
            let reader = Reader::new(Target::Webcall, kind, "P7dLw1zQe9");
            assert!(matches!(reader.read(&relayed), Ok(Received::Stamped(123_456_789))), "{relayed}");
            // From another peer (or written otherwise): the typed parser reads it all the same.
            let other = r.encode_from("Kq3vT9pLm2");
            assert!(matches!(reader.read(&other), Ok(Received::Stamped(123_456_789))), "{other}");
            let spaced = relayed.replace(",", ", ");
            assert!(matches!(reader.read(&spaced), Ok(Received::Stamped(123_456_789))), "{spaced}");
        }
        let reader = Reader::new(Target::Webcall, Kind::Answer, "P7dLw1zQe9");
        let hello = webcall_protocol::encode_hello("P7dLw1zQe9", "bench1");
        assert!(matches!(reader.read(&hello), Ok(Received::Other)));
        let refused = webcall_protocol::ProtocolError::new(webcall_protocol::ErrorCode::RateLimited, "slow down");
        assert!(reader.read(&refused.to_json()).is_err());
        assert!(reader.read("nonsense").is_err());
    }
}
