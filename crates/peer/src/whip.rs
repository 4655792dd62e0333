//! `webcall peer --whip`: publish `--send` into `--room` through the server's WHIP endpoint (RFC 9725,
//! docs/whip.md) instead of the signaling WebSocket, as OBS or a GStreamer pipeline would: one `POST` of our offer
//! (host candidates in it: no trickle), the server's answer (its candidates in it) in the `201`, a `DELETE` of the
//! `Location` when leaving. The media session is [`crate::sfu`]'s; stats come in the same `stats sfu …` lines.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST, LOCATION};
use hyper::{HeaderMap, Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use url::Url;

use crate::media::SourceHandle;
use crate::sfu::{self, SfuSessionConfig, ToSfu};
use crate::{exit, out, PeerArgs, PeerError};
use webcall_protocol::Signal;

/// A WHIP request that gets no answer in this long has failed (the server answers at once, or never).
const HTTP_TIMEOUT: Duration = Duration::from_secs(15);

fn whip_err(what: impl Into<String>) -> PeerError {
    PeerError::Whip(what.into())
}

/// The WHIP endpoint of `--server` (the URL pages and peers join with: `ws://HOST:PORT/ws`, or the page's
/// `https://HOST:PORT`) for `room`, with `?name=`.
pub fn endpoint(server: &str, room: &str, name: &str) -> Result<Url, PeerError> {
    let bad = |why: &str| PeerError::BadServerUrl { url: server.to_owned(), why: why.to_owned() };
    let mut url = Url::parse(server).map_err(|e| bad(&e.to_string()))?;
    let scheme = match url.scheme() {
        "ws" | "http" => "http",
        "wss" | "https" => "https",
        _ => return Err(bad("the scheme must be ws, wss, http or https")),
    };
    url.set_scheme(scheme).map_err(|_| bad("the scheme cannot be changed to http(s)"))?;
    if url.host_str().is_none() {
        return Err(bad("no host"));
    }
    url.set_path(&format!("/whip/{room}"));
    url.set_fragment(None);
    url.query_pairs_mut().clear().append_pair("name", name);
    Ok(url)
}

/// An HTTP/1.1 answer, whole.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).trim().to_owned()
    }
}

/// One request on a connection of its own (WHIP makes two or three in a session's life).
async fn request(
    url: &Url,
    method: Method,
    bearer: Option<&str>,
    body: Option<(&'static str, String)>,
) -> Result<Answer, PeerError> {
    let what = format!("WHIP {method} {url}");
    let fut = async {
        let host = url.host_str().ok_or_else(|| whip_err(format!("{what}: no host")))?;
        let port = url.port_or_known_default().unwrap_or(80);
        let mut req = Request::builder().method(method.clone()).uri(&url[url::Position::BeforePath..]);
        let authority = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_owned(),
        };
        req = req.header(HOST, authority);
        if let Some(b) = bearer {
            req = req.header(AUTHORIZATION, format!("Bearer {b}"));
        }
        let payload = match body {
            Some((ty, b)) => {
                req = req.header(CONTENT_TYPE, ty);
                Bytes::from(b)
            }
            None => Bytes::new(),
        };
        let req = req.body(Full::new(payload)).map_err(|e| whip_err(format!("{what}: {e}")))?;
        // Brackets of an IPv6 literal are not part of the address to connect to.
        let tcp = TcpStream::connect((host.trim_start_matches('[').trim_end_matches(']'), port))
            .await
            .map_err(|e| whip_err(format!("{what}: cannot connect: {e}")))?;
        tcp.set_nodelay(true).ok();
        if url.scheme() == "https" {
            let cfg = crate::gather::bridge::client_config().map_err(|e| whip_err(format!("{what}: {e}")))?;
            let name = crate::gather::bridge::server_name(host).map_err(|e| whip_err(format!("{what}: {e}")))?;
            let tls = tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await.map_err(|e| {
                whip_err(format!("{what}: TLS: {e} (a self-signed server certificate: SSL_CERT_FILE=cert.pem)"))
            })?;
            send(tls, req).await
        } else {
            send(tcp, req).await
        }
        .map_err(|e| whip_err(format!("{what}: {e}")))
    };
    tokio::time::timeout(HTTP_TIMEOUT, fut)
        .await
        .map_err(|_| whip_err(format!("{what}: no answer within {} s", HTTP_TIMEOUT.as_secs())))?
}

async fn send<S>(io: S, req: Request<Full<Bytes>>) -> Result<Answer, hyper::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(conn);
    let (parts, body) = sender.send_request(req).await?.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Answer { status: parts.status, headers: parts.headers, body })
}

/// Publishes until `--duration`, SIGTERM or Ctrl-C; the exit code as `webcall peer`'s.
pub async fn run(args: PeerArgs, source: Option<SourceHandle>) -> Result<i32, PeerError> {
    let source = source.ok_or(PeerError::WhipWithoutSend)?;
    let url = endpoint(&args.server, &args.room, &args.name)?;
    let bearer = args.token.clone().or(args.password.clone());
    let (sig_tx, mut sig) = mpsc::unbounded_channel();
    let session = sfu::start(SfuSessionConfig {
        local_ips: crate::local_ips(&args),
        source: Some(source),
        record_dir: None,
        count_only: false,
        offer_first: true,
        names: HashMap::new(),
        signal: sig_tx,
    })
    .await?;
    let Some((_, Signal::Offer(offer))) = sig.recv().await else {
        return Err(whip_err("the media session made no offer"));
    };
    let a = request(&url, Method::POST, bearer.as_deref(), Some(("application/sdp", offer))).await?;
    if a.status != StatusCode::CREATED {
        session.send(ToSfu::Close);
        out(format!("whip refused: {} {}", a.status.as_u16(), a.text()));
        return Ok(exit::SIGNALING);
    }
    let resource = a
        .headers
        .get(LOCATION)
        .and_then(|l| l.to_str().ok())
        .and_then(|l| url.join(l).ok())
        .ok_or_else(|| whip_err(format!("POST {url}: 201 without a Location")))?;
    let ty = a.headers.get(CONTENT_TYPE).and_then(|t| t.to_str().ok()).unwrap_or("");
    if !ty.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("application/sdp") {
        session.send(ToSfu::Close);
        return Err(whip_err(format!("POST {url}: the answer is {ty:?}, not application/sdp")));
    }
    session.send(ToSfu::Answer(String::from_utf8_lossy(&a.body).into_owned()));
    out(format!("joined room {} via whip {resource}", args.room));

    let mut stats = tokio::time::interval(args.stats_every.max(Duration::from_millis(100)));
    let deadline = args.duration.map(|d| tokio::time::Instant::now() + d);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| PeerError::Io { what: "installing the SIGTERM handler".into(), source: e })?;
    let counters = Arc::clone(&session.counters);
    let mut was_connected = false;
    loop {
        tokio::select! {
            _ = stats.tick() => {
                was_connected |= counters.connected.load(Ordering::Relaxed);
                out(session.stats_line(false));
                if counters.closed.load(Ordering::Relaxed) {
                    out("sfu session ended");
                    break;
                }
            }
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => break,
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    was_connected |= counters.connected.load(Ordering::Relaxed);
    session.send(ToSfu::Close);
    // Leave the room at once rather than when the server notices the media stopped.
    match request(&resource, Method::DELETE, bearer.as_deref(), None).await {
        Ok(a) if a.status.is_success() => {}
        Ok(a) => tracing::warn!("DELETE {resource}: {} {}", a.status, a.text()),
        Err(e) => tracing::warn!("{e}"),
    }
    out(session.stats_line(true));
    let code = if !was_connected {
        exit::NOT_CONNECTED
    } else if counters.frames_out.load(Ordering::Relaxed) == 0 {
        exit::NO_MEDIA
    } else {
        exit::OK
    };
    out(format!("exit {code}"));
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::endpoint;

    #[test]
    fn the_endpoint_comes_from_the_server_url() {
        let e = |s| endpoint(s, "room-1", "Cam A").map(|u| u.to_string());
        assert_eq!(e("ws://127.0.0.1:8080/ws").unwrap(), "http://127.0.0.1:8080/whip/room-1?name=Cam+A");
        assert_eq!(e("wss://call.example.org/ws?x=1").unwrap(), "https://call.example.org/whip/room-1?name=Cam+A");
        assert_eq!(e("https://[::1]:8443").unwrap(), "https://[::1]:8443/whip/room-1?name=Cam+A");
        assert!(e("ftp://x/").is_err());
        assert!(e("not a url").is_err());
    }
}
