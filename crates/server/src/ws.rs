//! One WebSocket, one task: it reads frames into the router, and when woken takes the frames queued for this
//! connection and writes them. Nothing here knows about rooms.

use crate::router::ConnSignal;
use crate::upgrade::{Read, ReadError, WebSocket};
use crate::AppState;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::{timeout, Instant};
use webcall_protocol::{ErrorCode, ProtocolError};
use webcall_rooms::{close, ConnId, Frame, FLOOD_FACTOR};
use webcall_wsframe::{opcode, Event};

/// Writes taking longer than this mean the peer stopped reading; the connection is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a close may wait for pending writes and the close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Answers a connection that may not stay with one `error` and a policy close.
pub(crate) async fn refuse(mut socket: WebSocket, e: ProtocolError) {
    let mut out = Vec::new();
    webcall_wsframe::encode(&mut out, opcode::TEXT, e.to_json().as_bytes());
    webcall_wsframe::encode_close(&mut out, close::POLICY, e.code.as_str());
    let _ = timeout(CLOSE_GRACE, socket.write(&out)).await;
}

/// Sends the close frame the core asked for, if it asked.
async fn send_close(socket: &mut WebSocket, signal: &ConnSignal) {
    if let Some((code, reason)) = signal.close_requested() {
        let _ = timeout(CLOSE_GRACE, socket.send_close(code, reason)).await;
    }
}

/// What the loop does next.
enum Step {
    Go,
    Stop,
}

/// Takes this connection's queued frames and writes them (all that are queued, in one write), until none are left.
/// `Stop` when the connection is done (a write failed or timed out, or a close was asked for: then the close frame
/// has been sent, after every frame queued before the request).
/// `rest`: bytes a [`quick_flush`] could not write, written first (in the first write, with its timeouts).
async fn flush(socket: &mut WebSocket, state: &AppState, signal: &ConnSignal, conn: ConnId, mut rest: Vec<u8>) -> Step {
    // Local, not kept between wake-ups: an idle connection holds no frame buffer.
    let mut buf: Vec<Frame> = Vec::new();
    loop {
        // Read before taking: the core queues a connection's last frames (e.g. `server-shutdown`) before it asks
        // for the close, so once a close is seen here, this take has them all. (Checked after the take, a close
        // requested in between went out without the frames queued with it.)
        let closing = signal.close_requested().is_some();
        state.router.take(conn, &mut buf);
        if buf.is_empty() && rest.is_empty() {
            if closing {
                send_close(socket, signal).await;
                return Step::Stop;
            }
            break;
        }
        // Asked to close: finish only if that is quick.
        let limit = if closing { CLOSE_GRACE } else { WRITE_TIMEOUT };
        // Wake-ups during the write mean more frames (take again after it) or a close request.
        let mut again = false;
        let written = {
            let write = timeout(limit, async {
                if !rest.is_empty() {
                    socket.write(&rest).await?;
                }
                socket.write_texts(&buf).await
            });
            tokio::pin!(write);
            loop {
                tokio::select! {
                    r = &mut write => break matches!(r, Ok(Ok(()))),
                    _ = signal.wake.notified() => {
                        again = true;
                        if signal.close_requested().is_some() {
                            // Asked to close mid-write (slow reader, abuse): finish only if that is quick; then
                            // the frames queued with the request, and the close.
                            break matches!(timeout(CLOSE_GRACE, &mut write).await, Ok(Ok(Ok(()))));
                        }
                    }
                }
            }
        };
        buf.clear();
        rest = Vec::new();
        if !written {
            send_close(socket, signal).await;
            return Step::Stop;
        }
        if !again && !closing {
            break;
        }
    }
    // A close requested since the check above has woken the connection (its permit is kept): the next flush sends
    // it after the frames queued with it.
    Step::Go
}

thread_local! {
    /// The frames a quick flush takes; empty between uses.
    static QUICK: std::cell::RefCell<Vec<Frame>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// What a wake-up needs after [`quick_flush`].
enum Quick {
    /// Everything queued went out (or nothing was queued).
    Done,
    /// The full [`flush`], first writing these bytes the socket did not take.
    Slow(Vec<u8>),
}

/// The usual wake-up of a relay, without a future or a buffer of the connection's: take the frames queued for
/// `conn` and write them if the socket takes them all at once. A close request, or a socket that is full or
/// failed, goes the way of [`flush`].
fn quick_flush(socket: &mut WebSocket, state: &AppState, signal: &ConnSignal, conn: ConnId) -> Quick {
    if signal.close_requested().is_some() {
        return Quick::Slow(Vec::new());
    }
    QUICK.with(|q| {
        let mut frames = q.borrow_mut();
        state.router.take(conn, &mut frames);
        let r = if frames.is_empty() {
            Quick::Done
        } else {
            match socket.try_write_texts(&frames) {
                Ok(None) => Quick::Done,
                Ok(Some(rest)) => Quick::Slow(rest),
                // The full flush's write fails the same way and closes.
                Err(_) => Quick::Slow(Vec::new()),
            }
        };
        frames.clear();
        // A burst's list is not kept.
        if frames.capacity() > 64 {
            *frames = Vec::new();
        }
        r
    })
}

/// Tells a flooding client why it is closed: `rate-limited`, then close 1008 with reason [`close::FLOODING`].
async fn close_flooding(socket: &mut WebSocket, rate: f64) {
    let e = ProtocolError::new(
        ErrorCode::RateLimited,
        format!("sent more than {rate} messages per second for {FLOOD_FACTOR} s without a break; closing"),
    );
    let mut out = Vec::new();
    webcall_wsframe::encode(&mut out, opcode::TEXT, e.to_json().as_bytes());
    webcall_wsframe::encode_close(&mut out, close::POLICY, close::FLOODING);
    let _ = timeout(CLOSE_GRACE, socket.write(&out)).await;
}

/// After a pause, a read that had to wait longer than this for data means the client was not backlogged.
const RESUME_SLACK: Duration = Duration::from_millis(500);

/// Message credit of one connection: `rate` per second, up to twice that at once.
struct Pace {
    rate: f64,
    credit: f64,
    refilled: Instant,
}

impl Pace {
    fn new(rate: f64) -> Self {
        Pace { rate, credit: rate * 2.0, refilled: Instant::now() }
    }

    /// Takes a credit for a message just handed on; `false` when there is none left for the next one. Within a
    /// read the clock is read only when credit runs low.
    fn take(&mut self) -> bool {
        self.credit -= 1.0;
        if self.credit >= 1.0 {
            return true;
        }
        self.refill(Instant::now());
        self.credit >= 1.0
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.credit = (self.credit + dt * self.rate).min(self.rate * 2.0);
        self.refilled = now;
    }

    /// How long until the next credit.
    fn until_credit(&self) -> Duration {
        Duration::from_secs_f64(((1.0 - self.credit) / self.rate).max(0.0))
    }
}

/// When the connection's one timer fires next.
fn deadline(next_ping: Instant, idle_at: Instant, resume_at: Option<Instant>) -> Instant {
    let t = next_ping.min(idle_at);
    resume_at.map_or(t, |r| r.min(t))
}

pub(crate) async fn run(mut socket: WebSocket, state: Arc<AppState>, ip: IpAddr) {
    let conn = state.next_conn.fetch_add(1, Ordering::Relaxed);
    let signal = Arc::new(ConnSignal::default());
    state.policy.register(conn, ip);
    state.router.connect(conn, signal.clone());

    let idle = state.cfg.idle_timeout;
    let ping_every = state.cfg.ping_interval;
    // Pacing (backpressure): every message read takes a credit; credit refills at `--rate-limit` up to twice that.
    // Out of credit, reading stops (the rest stays in the socket, or in the frames already read) until a credit is
    // back, so a burst is read more slowly, not refused. A connection paced without a break for `FLOOD_FACTOR`
    // seconds (that many times the rate ahead) is flooding, and is closed.
    let mut pace = Pace::new(state.cfg.rooms.rate_per_sec);
    let mut resume_at: Option<Instant> = None;
    let mut paced_since: Option<Instant> = None;
    // One timer for both the idle timeout and pings: reads only record when they happened, and the timer is
    // reset when it fires (far cheaper than re-arming it on every frame).
    let mut last_read = Instant::now();
    let mut next_ping = last_read + ping_every;
    let timer = tokio::time::sleep_until(next_ping.min(last_read + idle));
    tokio::pin!(timer);
    // Set by the read handler, acted on after it: a ping to answer, the client's close code.
    let mut pong: Option<Vec<u8>> = None;
    let mut client_close: Option<u16> = None;
    // When the current read's data was read (the first text frame of it asks the clock).
    let mut read_at: Option<Instant> = None;

    loop {
        tokio::select! {
            biased;
            _ = signal.wake.notified() => {
                // Boxed: the write's state (timeouts, the close frame) lives only while it runs, not in every
                // connection's future.
                if let Quick::Slow(rest) = quick_flush(&mut socket, &state, &signal, conn) {
                    if let Step::Stop = Box::pin(flush(&mut socket, &state, &signal, conn, rest)).await {
                        break;
                    }
                }
            }
            () = &mut timer => {
                let now = Instant::now();
                if resume_at.is_some_and(|t| now >= t) {
                    // Paused reading is not the client's silence.
                    resume_at = None;
                    last_read = now;
                }
                if resume_at.is_none() && now >= last_read + idle {
                    tracing::debug!(conn, "dropped: idle for {idle:?}");
                    break;
                }
                if now >= next_ping {
                    let ping = Box::pin(timeout(WRITE_TIMEOUT, socket.send(opcode::PING, &[])));
                    if !matches!(ping.await, Ok(Ok(()))) {
                        break;
                    }
                    next_ping = Instant::now() + ping_every;
                }
                timer.as_mut().reset(deadline(next_ping, last_read + idle, resume_at));
            }
            read = std::future::poll_fn(|cx| socket.poll_read_frames(cx, &mut |event| match event {
                Event::Text(t) => {
                    // One clock read per read, shared by the room core and the pacing below.
                    let now = *read_at.get_or_insert_with(Instant::now);
                    state.router.message_at(conn, t, now.into_std());
                    pace.take()
                }
                Event::Binary(len) => {
                    state.router.binary(conn, len);
                    pace.take()
                }
                Event::Ping(payload) => {
                    pong = Some(payload.to_vec());
                    true
                }
                Event::Pong => true,
                Event::Close(c) => {
                    client_close = Some(c.map_or(webcall_wsframe::close_code::NORMAL, |(code, _)| code));
                    false
                }
            })), if resume_at.is_none() => {
                let now = read_at.take().unwrap_or_else(Instant::now);
                // Since the previous read, or since reading resumed after a pause.
                let waited = now.saturating_duration_since(last_read);
                last_read = now;
                // Refilled at every read too (with the clock read anyway), so quiet time counts up to the cap.
                pace.refill(now);
                match read {
                    Ok(Read::More) => paced_since = None,
                    Ok(Read::Eof) => break,
                    Ok(Read::Stopped) if client_close.is_none() => {
                        // Out of credit: wait for one. Flooding is being paced with data always waiting; a client
                        // that had to be waited for after the last pause was not.
                        if waited > RESUME_SLACK {
                            paced_since = None;
                        }
                        let since = *paced_since.get_or_insert(now);
                        if now.saturating_duration_since(since).as_secs_f64() > FLOOD_FACTOR {
                            tracing::debug!(conn, "closed: flooding");
                            Box::pin(close_flooding(&mut socket, pace.rate)).await;
                            break;
                        }
                        resume_at = Some(now + pace.until_credit());
                        timer.as_mut().reset(deadline(next_ping, last_read + idle, resume_at));
                    }
                    Ok(Read::Stopped) => {
                        // Answer the client's close with its code (RFC 6455 §5.5.1), then go.
                        let code = client_close.unwrap_or(webcall_wsframe::close_code::NORMAL);
                        let _ = Box::pin(timeout(CLOSE_GRACE, socket.send_close(code, ""))).await;
                        break;
                    }
                    Err(ReadError::Io(e)) => {
                        tracing::debug!(conn, "read error: {e}");
                        break;
                    }
                    Err(ReadError::Violation(v)) => {
                        tracing::debug!(conn, "closed: {v}");
                        if v == webcall_wsframe::Violation::TooBig {
                            // Close the way the core closes messages over its limit, after what is queued.
                            signal.request_close(close::TOO_BIG, "message too large");
                            let _ = Box::pin(flush(&mut socket, &state, &signal, conn, Vec::new())).await;
                        } else {
                            let _ = Box::pin(timeout(CLOSE_GRACE, socket.send_close(v.close_code(), v.reason()))).await;
                        }
                        break;
                    }
                }
                if let Some(payload) = pong.take() {
                    let write = Box::pin(timeout(WRITE_TIMEOUT, socket.send(opcode::PONG, &payload)));
                    if !matches!(write.await, Ok(Ok(()))) {
                        break;
                    }
                }
            }
        }
    }
    state.router.disconnect(conn);
    state.policy.unregister(conn);
}
