//! `webcall peer --janus`: the same native peer in a Janus VideoRoom (Janus 1.x, multistream), driven over Janus's
//! HTTP API, so that bench/sfu.sh loads Janus exactly as it loads webcall's SFU. Benchmark use only.
//!
//! With `--send`, a publisher handle joins `--room` (a number; created if missing) and publishes the source; with
//! `--count-only` or `--record`, a subscriber handle waits for `--expect` other publishers and subscribes to all of
//! them in one peer connection (Janus offers, we answer). Both sessions are [`crate::sfu`]'s; stats come in the same
//! `stats sfu …` lines.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

// Untyped JSON on purpose: this is Janus's own HTTP API, not webcall's protocol (crates/protocol).
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::sfu::{self, SfuPeer, SfuSessionConfig, ToSfu, Track};
use crate::{exit, out, PeerArgs, PeerError};
use webcall_protocol::Signal;

fn err(what: impl Into<String>) -> PeerError {
    PeerError::Io { what: what.into(), source: std::io::Error::other("Janus") }
}

struct Janus {
    host: String,
    path: String,
    session: u64,
}

/// One HTTP/1.1 request (`Connection: close`), its body as JSON.
async fn http(host: &str, method: &str, path: &str, body: Option<&Value>) -> Result<Value, PeerError> {
    let io = |e| PeerError::Io { what: format!("Janus HTTP {method} {path}"), source: e };
    let mut s = TcpStream::connect(host).await.map_err(io)?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.map_err(io)?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).await.map_err(io)?;
    let text = String::from_utf8_lossy(&resp);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| err(format!("Janus: no HTTP body in {text}")))?;
    // libmicrohttpd may answer chunked.
    let _ = head;
    serde_json::from_str(body)
        .or_else(|_| serde_json::from_str(&dechunk(body)))
        .map_err(|e| err(format!("Janus: unreadable answer {body:?}: {e}")))
}

/// The body of a chunked HTTP answer.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

fn tx() -> String {
    format!("{:016x}", rand::random::<u64>())
}

impl Janus {
    async fn create(url: &str) -> Result<Janus, PeerError> {
        let rest = url.strip_prefix("http://").ok_or_else(|| err("--janus needs an http:// URL of Janus's API"))?;
        let (host, path) = rest.split_once('/').unwrap_or((rest, "janus"));
        let (host, path) = (host.to_owned(), format!("/{path}"));
        let r = http(&host, "POST", &path, Some(&json!({"janus": "create", "transaction": tx()}))).await?;
        let session = r["data"]["id"].as_u64().ok_or_else(|| err(format!("Janus create: {r}")))?;
        Ok(Janus { host, path, session })
    }

    async fn post(&self, path: &str, body: Value) -> Result<Value, PeerError> {
        http(&self.host, "POST", &format!("{}/{}{path}", self.path, self.session), Some(&body)).await
    }

    async fn attach(&self) -> Result<u64, PeerError> {
        let r =
            self.post("", json!({"janus": "attach", "plugin": "janus.plugin.videoroom", "transaction": tx()})).await?;
        r["data"]["id"].as_u64().ok_or_else(|| err(format!("Janus attach: {r}")))
    }

    /// A plugin message; the immediate answer (`success` with plugindata for synchronous requests, else `ack`).
    async fn message(&self, handle: u64, body: Value, jsep: Option<Value>) -> Result<Value, PeerError> {
        let mut m = json!({"janus": "message", "body": body, "transaction": tx()});
        if let Some(j) = jsep {
            m["jsep"] = j;
        }
        self.post(&format!("/{handle}"), m).await
    }

    async fn trickle_done(&self, handle: u64) -> Result<Value, PeerError> {
        self.post(
            &format!("/{handle}"),
            json!({"janus": "trickle", "candidate": {"completed": true}, "transaction": tx()}),
        )
        .await
    }

    /// Long-polls events (up to 10 at once) until the receiver goes.
    fn poll(&self, events: mpsc::UnboundedSender<Value>) {
        let (host, path) = (self.host.clone(), format!("{}/{}?maxev=10", self.path, self.session));
        tokio::spawn(async move {
            loop {
                match http(&host, "GET", &path, None).await {
                    Ok(Value::Array(a)) => {
                        for e in a {
                            if events.send(e).is_err() {
                                return;
                            }
                        }
                    }
                    Ok(e) => {
                        if events.send(e).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::warn!("{e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        });
    }
}

/// Waits for the plugin event of `handle` that `want` picks, or an error event of it. Other events are kept for
/// later: another handle's, and notifications in between (a publisher's handle also hears of every publisher that
/// joins the room, and such an event may come before the answer to its `publish`).
async fn event(
    rx: &mut mpsc::UnboundedReceiver<Value>,
    kept: &mut Vec<Value>,
    handle: u64,
    what: &str,
    want: impl Fn(&Value) -> bool,
) -> Result<Value, PeerError> {
    let error = |e: &Value| e["plugindata"]["data"]["error_code"].as_u64();
    let ours =
        |e: &Value| e["sender"].as_u64() == Some(handle) && e["janus"] == "event" && (want(e) || error(e).is_some());
    let found = match kept.iter().position(ours) {
        Some(i) => kept.remove(i),
        None => {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                let e = tokio::time::timeout_at(deadline, rx.recv())
                    .await
                    .map_err(|_| err(format!("Janus: no {what} within 30 s")))?
                    .ok_or_else(|| err("Janus: event poll ended"))?;
                if ours(&e) {
                    break e;
                }
                kept.push(e);
            }
        }
    };
    match error(&found) {
        Some(code) => Err(err(format!("Janus {what}: error {code}: {}", found["plugindata"]["data"]["error"]))),
        None => Ok(found),
    }
}

/// An event that carries a JSEP offer or answer.
fn has_sdp(e: &Value) -> bool {
    e["jsep"]["sdp"].is_string()
}

pub async fn run(args: PeerArgs, source: Option<crate::media::SourceHandle>) -> Result<i32, PeerError> {
    let room: u64 = args.room.parse().map_err(|_| err("--janus: --room must be a number (a VideoRoom id)"))?;
    let j = Janus::create(&args.server).await?;
    let (ev_tx, mut ev) = mpsc::unbounded_channel();
    j.poll(ev_tx);
    let mut kept = Vec::new();
    let ips = crate::local_ips(&args);
    let session_cfg = |source, offer_first, signal| SfuSessionConfig {
        local_ips: ips.clone(),
        source,
        record_dir: args.record.clone(),
        count_only: args.count_only,
        offer_first,
        names: HashMap::new(),
        signal,
    };
    // Whoever comes first makes the room (427: it exists already).
    let admin = j.attach().await?;
    let r = j
        .message(
            admin,
            json!({"request": "create", "room": room, "publishers": 1000, "videocodec": "vp8", "audiocodec": "opus",
                   "bitrate": 0, "notify_joining": false}),
            None,
        )
        .await?;
    let code = r["plugindata"]["data"]["error_code"].as_u64();
    if code.is_some_and(|c| c != 427) {
        return Err(err(format!("Janus create room: {r}")));
    }
    out(format!("joined room {room} as janus-{}", j.session));

    let mut sessions: Vec<SfuPeer> = Vec::new();
    let mut my_feed = None;
    // Publisher: join, then our offer goes out as `publish`; Janus's answer comes as an event.
    if let Some(src) = source {
        let h = j.attach().await?;
        j.message(h, json!({"request": "join", "ptype": "publisher", "room": room, "display": args.name}), None)
            .await?;
        let joined =
            event(&mut ev, &mut kept, h, "joined", |e| e["plugindata"]["data"]["videoroom"] == "joined").await?;
        my_feed = joined["plugindata"]["data"]["id"].as_u64();
        let (sig_tx, mut sig) = mpsc::unbounded_channel();
        let s = sfu::start(session_cfg(Some(src), true, sig_tx)).await?;
        let Some((_, Signal::Offer(sdp))) = sig.recv().await else { return Err(err("no offer from the session")) };
        j.message(
            h,
            json!({"request": "publish", "audio": true, "video": true}),
            Some(json!({"type": "offer", "sdp": sdp})),
        )
        .await?;
        j.trickle_done(h).await?;
        let e = event(&mut ev, &mut kept, h, "publish answer", has_sdp).await?;
        let answer = e["jsep"]["sdp"].as_str().ok_or_else(|| err(format!("Janus publish: no answer in {e}")))?;
        s.send(ToSfu::Answer(answer.to_owned()));
        sessions.push(s);
    }
    // Subscriber: every other publisher, once --expect of them are there.
    if args.count_only || args.record.is_some() {
        let h = j.attach().await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let feeds = loop {
            let r = j.message(h, json!({"request": "listparticipants", "room": room}), None).await?;
            let feeds: Vec<u64> = r["plugindata"]["data"]["participants"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter(|p| p["publisher"] == true)
                        .filter_map(|p| p["id"].as_u64())
                        .filter(|id| Some(*id) != my_feed)
                        .collect()
                })
                .unwrap_or_default();
            if feeds.len() >= args.expect {
                break feeds;
            }
            if tokio::time::Instant::now() > deadline {
                return Ok(exit::NOT_CONNECTED);
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        };
        let streams: Vec<Value> = feeds.iter().map(|f| json!({"feed": f})).collect();
        j.message(h, json!({"request": "join", "ptype": "subscriber", "room": room, "streams": streams}), None).await?;
        let e = event(&mut ev, &mut kept, h, "subscriber offer", has_sdp).await?;
        let offer = e["jsep"]["sdp"].as_str().ok_or_else(|| err(format!("Janus subscribe: no offer in {e}")))?;
        let tracks: Vec<Track> = e["plugindata"]["data"]["streams"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| {
                        Some(Track {
                            mid: s["mid"].as_str()?.to_owned(),
                            peer: s["feed_id"].as_u64()?.to_string(),
                            kind: s["type"].as_str().unwrap_or("").to_owned(),
                            peer_mid: s["feed_mid"].as_str().unwrap_or("").to_owned(),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        let (sig_tx, mut sig) = mpsc::unbounded_channel();
        let s = sfu::start(session_cfg(None, false, sig_tx)).await?;
        s.send(ToSfu::Offer { sdp: offer.to_owned(), tracks });
        let Some((_, Signal::Answer(sdp))) = sig.recv().await else { return Err(err("no answer from the session")) };
        j.message(h, json!({"request": "start"}), Some(json!({"type": "answer", "sdp": sdp}))).await?;
        j.trickle_done(h).await?;
        sessions.push(s);
    }

    let mut stats = tokio::time::interval(args.stats_every.max(Duration::from_millis(100)));
    let deadline = args.duration.map(|d| tokio::time::Instant::now() + d);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| PeerError::Io { what: "installing the SIGTERM handler".into(), source: e })?;
    let line = |final_| {
        let c: Vec<&sfu::SfuCounters> = sessions.iter().map(|s| &*s.counters).collect();
        sfu::stats_line(final_, &c)
    };
    let mut was_connected = false;
    loop {
        tokio::select! {
            _ = stats.tick() => {
                was_connected |= sessions.iter().all(|s| s.counters.connected.load(Ordering::Relaxed));
                out(line(false));
            }
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => break,
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    for s in &sessions {
        s.send(ToSfu::Close);
    }
    let _ = j.post("", json!({"janus": "destroy", "transaction": tx()})).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    out(line(true));
    let code = if was_connected { exit::OK } else { exit::NOT_CONNECTED };
    out(format!("exit {code}"));
    Ok(code)
}

#[cfg(test)]
mod tests {
    #[test]
    fn chunked_answers_are_read() {
        let body = "53\r\n{\"janus\":\"success\",\"transaction\":\"60f40a1840c88fbd\",\"data\":{\"id\":6298676563794225}}\r\n0\r\n\r\n";
        let v: serde_json::Value = serde_json::from_str(&super::dechunk(body)).unwrap();
        assert_eq!(v["data"]["id"], 6298676563794225u64);
    }

    /// A publisher's handle hears of another publisher before the answer to its `publish` (seen in bench/sfu.sh's
    /// meeting runs): the notification is kept, the answer taken; an error event ends the wait.
    #[tokio::test]
    async fn the_answer_is_found_behind_a_notification() {
        use serde_json::json;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let data = |d: serde_json::Value| json!({"janus": "event", "sender": 7, "plugindata": {"data": d}});
        tx.send(data(json!({"videoroom": "event", "publishers": [{"id": 1}]}))).unwrap();
        tx.send(json!({"janus": "event", "sender": 8, "jsep": {"sdp": "not ours"}})).unwrap();
        let mut answer = data(json!({"videoroom": "event", "configured": "ok"}));
        answer["jsep"] = json!({"type": "answer", "sdp": "v=0"});
        tx.send(answer).unwrap();
        let mut kept = Vec::new();
        let e = super::event(&mut rx, &mut kept, 7, "publish answer", super::has_sdp).await.unwrap();
        assert_eq!(e["jsep"]["sdp"], "v=0");
        assert_eq!(kept.len(), 2, "the notification and the other handle's event stay: {kept:?}");
        tx.send(data(json!({"error_code": 426, "error": "No such feed"}))).unwrap();
        let e = super::event(&mut rx, &mut kept, 7, "subscriber offer", super::has_sdp).await.unwrap_err();
        assert!(e.to_string().contains("error 426"), "{e}");
    }
}
