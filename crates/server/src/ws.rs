//! One WebSocket, one task: it reads frames into the router, and when woken takes the frames queued for this
//! connection and writes them. Nothing here knows about rooms.

use crate::router::ConnSignal;
use crate::AppState;
use crate::upgrade::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::{SinkExt, StreamExt};
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use webcall_protocol::ProtocolError;
use std::time::Duration;
use tokio::time::{timeout, Instant};
use webcall_rooms::{close, ConnId, Frame};

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

/// Sends the close frame the core asked for, if it asked.
async fn send_close(socket: &mut WebSocket, signal: &ConnSignal) {
    if let Some((code, reason)) = signal.close_requested() {
        let frame = CloseFrame { code: code.into(), reason: Utf8Bytes::from_static(reason) };
        let _ = timeout(CLOSE_GRACE, socket.send(Message::Close(Some(frame)))).await;
    }
}

/// What the loop does next.
enum Step {
    Go,
    Stop,
}

/// Takes this connection's queued frames and writes them, until none are left. `Stop` when the connection is done
/// (a write failed or timed out, or a close was asked for: then the close frame has been sent).
async fn flush(socket: &mut WebSocket, state: &AppState, signal: &ConnSignal, conn: ConnId) -> Step {
    // Local, not kept between wake-ups: an idle connection holds no frame buffer.
    let mut buf: Vec<Frame> = Vec::new();
    loop {
        state.router.take(conn, &mut buf);
        if buf.is_empty() {
            break;
        }
        // Already asked to close (the wake-up for that came with these frames): finish only if that is quick.
        let limit = if signal.close_requested().is_some() { CLOSE_GRACE } else { WRITE_TIMEOUT };
        let mut batch = futures_util::stream::iter(buf.drain(..).map(|f| Ok(Message::Text(Utf8Bytes::from(&*f)))));
        let write = timeout(limit, socket.send_all(&mut batch));
        tokio::pin!(write);
        // Wake-ups during the write mean more frames (take again after it) or a close request.
        let mut again = false;
        let written = loop {
            tokio::select! {
                r = &mut write => break matches!(r, Ok(Ok(()))),
                _ = signal.wake.notified() => {
                    again = true;
                    if signal.close_requested().is_some() {
                        // Asked to close mid-write (slow reader, abuse): finish only if that is quick.
                        let _ = timeout(CLOSE_GRACE, &mut write).await;
                        break false;
                    }
                }
            }
        };
        drop(write);
        drop(batch);
        buf.clear();
        if !written {
            send_close(socket, signal).await;
            return Step::Stop;
        }
        if !again {
            break;
        }
    }
    if signal.close_requested().is_some() {
        send_close(socket, signal).await;
        return Step::Stop;
    }
    Step::Go
}

pub(crate) async fn run(mut socket: WebSocket, state: Arc<AppState>, ip: IpAddr) {
    let conn = state.next_conn.fetch_add(1, Ordering::Relaxed);
    let signal = Arc::new(ConnSignal::default());
    state.policy.register(conn, ip);
    state.router.connect(conn, signal.clone());

    let idle = state.cfg.idle_timeout;
    let ping_every = state.cfg.ping_interval;
    // One timer for both the idle timeout and pings: reads only record when they happened, and the timer is
    // reset when it fires (far cheaper than re-arming it on every frame).
    let mut last_read = Instant::now();
    let mut next_ping = last_read + ping_every;
    let timer = tokio::time::sleep_until(next_ping.min(last_read + idle));
    tokio::pin!(timer);

    loop {
        tokio::select! {
            biased;
            _ = signal.wake.notified() => {
                // Boxed: the write's state (timeouts, the close frame) lives only while it runs, not in every
                // connection's future.
                if let Step::Stop = Box::pin(flush(&mut socket, &state, &signal, conn)).await {
                    break;
                }
            }
            () = &mut timer => {
                let now = Instant::now();
                if now >= last_read + idle {
                    tracing::debug!(conn, "dropped: idle for {idle:?}");
                    break;
                }
                if now >= next_ping {
                    let ping = Box::pin(timeout(WRITE_TIMEOUT, socket.send(Message::Ping(Default::default()))));
                    if !matches!(ping.await, Ok(Ok(()))) {
                        break;
                    }
                    next_ping = Instant::now() + ping_every;
                }
                timer.as_mut().reset(next_ping.min(last_read + idle));
            }
            next = socket.next() => {
                last_read = Instant::now();
                match next {
                    None => break,
                    Some(Err(e)) => {
                        // Frames over the transport cap never reach the core; close them the way the core would.
                        if is_capacity_error(&e) {
                            signal.request_close(close::TOO_BIG, "message too large");
                            let _ = Box::pin(flush(&mut socket, &state, &signal, conn)).await;
                        }
                        tracing::debug!(conn, "read error: {e}");
                        break;
                    }
                    Some(Ok(msg)) => match msg {
                        Message::Text(t) => state.router.message(conn, t.as_str()),
                        Message::Binary(b) => state.router.binary(conn, b.len()),
                        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                        Message::Close(_) => break,
                    },
                }
            }
        }
    }
    state.router.disconnect(conn);
    state.policy.unregister(conn);
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
