//! One WebSocket: a reader that feeds the router and a writer that drains it. Nothing here knows about rooms.

use crate::router::ConnSignal;
use crate::AppState;
use crate::upgrade::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::{SinkExt, StreamExt};
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use webcall_protocol::ProtocolError;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::timeout;
use webcall_rooms::close;

/// Writes taking longer than this mean the peer stopped reading; the connection is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a close may wait for pending writes and the close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Answers a connection that may not stay with one `error` and a policy close.
pub(crate) async fn refuse(mut socket: WebSocket, e: ProtocolError) {
    let frame = CloseFrame { code: close::POLICY.into(), reason: Utf8Bytes::from(e.code.as_str()) };
    let _ = timeout(CLOSE_GRACE, async {
        socket.send(Message::Text(Utf8Bytes::from(e.to_json()))).await?;
        socket.send(Message::Close(Some(frame))).await
    })
    .await;
}

pub(crate) async fn run(socket: WebSocket, state: Arc<AppState>, ip: IpAddr) {
    let conn = state.next_conn.fetch_add(1, Ordering::Relaxed);
    let signal = Arc::new(ConnSignal::default());
    let router = state.router.clone();
    state.policy.register(conn, ip);
    router.connect(conn, signal.clone());
    let (mut sink, mut stream) = socket.split();
    let reader_done = Arc::new(Notify::new());
    let writer_done = Arc::new(Notify::new());

    let writer = {
        let (router, signal) = (router.clone(), signal.clone());
        let (reader_done, writer_done) = (reader_done.clone(), writer_done.clone());
        let ping_every = state.cfg.ping_interval;
        tokio::spawn(async move {
            let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
            let mut buf = Vec::new();
            loop {
                let (pinging, last) = tokio::select! {
                    _ = signal.wake.notified() => (false, false),
                    _ = ping.tick() => (true, false),
                    _ = reader_done.notified() => (false, true),
                };
                router.take(conn, &mut buf);
                if !buf.is_empty() {
                    let mut batch = futures_util::stream::iter(buf.drain(..).map(|f| Ok(Message::Text(Utf8Bytes::from(&*f)))));
                    let write = timeout(WRITE_TIMEOUT, sink.send_all(&mut batch));
                    tokio::pin!(write);
                    let written = tokio::select! {
                        r = &mut write => matches!(r, Ok(Ok(()))),
                        // Asked to close mid-write (slow reader, abuse): finish only if that is quick.
                        _ = signal.closing.notified() => {
                            let _ = timeout(CLOSE_GRACE, &mut write).await;
                            false
                        }
                    };
                    if !written {
                        drop(write);
                        if let Some((code, reason)) = signal.close_requested() {
                            let frame = CloseFrame { code: code.into(), reason: Utf8Bytes::from_static(reason) };
                            let _ = timeout(CLOSE_GRACE, sink.send(Message::Close(Some(frame)))).await;
                        }
                        break;
                    }
                }
                if pinging && !matches!(timeout(WRITE_TIMEOUT, sink.send(Message::Ping(Default::default()))).await, Ok(Ok(()))) {
                    break;
                }
                if let Some((code, reason)) = signal.close_requested() {
                    let frame = CloseFrame { code: code.into(), reason: Utf8Bytes::from_static(reason) };
                    let _ = timeout(CLOSE_GRACE, sink.send(Message::Close(Some(frame)))).await;
                    break;
                }
                if last {
                    break;
                }
            }
            writer_done.notify_one();
        })
    };

    let idle = state.cfg.idle_timeout;
    loop {
        let next = tokio::select! {
            _ = writer_done.notified() => break,
            n = timeout(idle, stream.next()) => n,
        };
        match next {
            Err(_) => {
                tracing::debug!(conn, "dropped: idle for {idle:?}");
                break;
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                // Frames over the transport cap never reach the core; close them the way the core would.
                if is_capacity_error(&e) {
                    signal.request_close(close::TOO_BIG, "message too large");
                }
                tracing::debug!(conn, "read error: {e}");
                break;
            }
            Ok(Some(Ok(msg))) => match msg {
                Message::Text(t) => router.message(conn, t.as_str()),
                Message::Binary(b) => router.binary(conn, b.len()),
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                Message::Close(_) => break,
            },
        }
    }
    router.disconnect(conn);
    state.policy.unregister(conn);
    reader_done.notify_one();
    let _ = timeout(Duration::from_secs(2), writer).await;
}

fn is_capacity_error(e: &crate::upgrade::Error) -> bool {
    use std::error::Error;
    let mut source: Option<&dyn Error> = Some(e);
    while let Some(s) = source {
        if let Some(t) = s.downcast_ref::<tungstenite::Error>() {
            return matches!(t, tungstenite::Error::Capacity(_));
        }
        source = s.source();
    }
    false
}
