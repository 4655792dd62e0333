//! What the peer-to-peer sessions and the SFU session share: the process's DTLS certificate, the str0m `Rtc` they
//! are built on (VP8 and Opus only), and their UDP sockets.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use str0m::config::DtlsCert;
use str0m::Rtc;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

/// The process's DTLS certificate, shared by every session (see [`dtls_cert`]).
static DTLS_CERT: OnceLock<Option<DtlsCert>> = OnceLock::new();

/// The DTLS certificate every session of this process uses; generated on the first call, which blocks.
///
/// The first call is slow (~50-60 ms of CPU): the certificate's key is the first thing to draw from aws-lc's
/// random generator, whose CPU-jitter entropy source seeds itself once per process. Left to str0m, that
/// happened inside `Session::start` of the first call, on both peers, before the offer or answer could go out.
/// [`prepare_dtls_cert`] moves it to start-up, alongside the signaling connection.
pub fn dtls_cert() -> Option<DtlsCert> {
    DTLS_CERT
        .get_or_init(|| {
            let t = Instant::now();
            let cert = str0m::crypto::from_feature_flags().dtls_provider.generate_certificate();
            tracing::debug!("DTLS certificate generated in {:?}", t.elapsed());
            cert
        })
        .clone()
}

/// Starts generating the DTLS certificate on a thread of its own, so the first session finds it ready.
pub fn prepare_dtls_cert() {
    let _ = std::thread::Builder::new().name("dtls-cert".into()).spawn(|| {
        dtls_cert();
    });
}

/// A new `Rtc` with VP8 and Opus only and the process's DTLS certificate; `stats`: str0m's stats interval.
pub async fn new_rtc(stats: Option<Duration>) -> Rtc {
    // Normally ready by now (prepare_dtls_cert at start-up); otherwise wait for it off the runtime.
    let cert = match DTLS_CERT.get() {
        Some(c) => c.clone(),
        None => tokio::task::spawn_blocking(dtls_cert).await.ok().flatten(),
    };
    let mut builder = Rtc::builder().clear_codecs().enable_vp8(true).enable_opus(true, false).set_stats_interval(stats);
    if let Some(cert) = cert {
        builder = builder.set_dtls_cert(cert);
    }
    builder.build(Instant::now())
}

/// A received datagram: (contents, source, the local address it came to).
pub type Datagram = (Vec<u8>, SocketAddr, SocketAddr);

/// Binds one UDP socket per address (in `ips`' order) and a task per socket that passes what it reads to `tx`.
pub async fn bind_udp(
    ips: &[IpAddr],
    tx: mpsc::Sender<Datagram>,
) -> Result<(Vec<(SocketAddr, Arc<UdpSocket>)>, Vec<tokio::task::JoinHandle<()>>), crate::PeerError> {
    let mut sockets = Vec::new();
    let mut readers = Vec::new();
    for &ip in ips {
        let sock = UdpSocket::bind(SocketAddr::new(ip, 0))
            .await
            .map_err(|e| crate::PeerError::Io { what: format!("binding a UDP socket on {ip}"), source: e })?;
        let local = sock.local_addr().map_err(|e| crate::PeerError::Io { what: "local_addr".into(), source: e })?;
        let sock = Arc::new(sock);
        sockets.push((local, sock.clone()));
        let tx = tx.clone();
        readers.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            loop {
                match sock.recv_from(&mut buf).await {
                    Ok((n, src)) => {
                        if tx.send((buf[..n].to_vec(), src, local)).await.is_err() {
                            return;
                        }
                    }
                    // ICMP port-unreachable from a peer that went away shows up here on Linux: keep reading.
                    Err(e) => tracing::debug!("udp recv on {local}: {e}"),
                }
            }
        }));
    }
    Ok((sockets, readers))
}

/// How long the counting reader sleeps between draining its socket once connected.
const COUNT_NAP: Duration = Duration::from_millis(5);
/// Until connected, a blocked read gives up this often to look at the stop flag.
const COUNT_READ_TIMEOUT: Duration = Duration::from_millis(50);
/// A counting socket's receive buffer: a few hundred ms of a subscriber's media. With dozens of peers on one
/// generator core a drain can come tens of ms late, and what the default buffer (~90 datagrams) could not hold
/// would be counted as the server's loss.
const COUNT_RCVBUF: libc::c_int = 4 << 20;

/// Sets [`COUNT_RCVBUF`], past `net.core.rmem_max` where allowed (root: SO_RCVBUFFORCE); best effort.
fn deepen_receive_buffer(sock: &std::net::UdpSocket) {
    use std::os::fd::AsRawFd;
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: setsockopt reads one c_int from a live local.
        let r = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                &COUNT_RCVBUF as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            return;
        }
    }
}

/// [`bind_udp`] for the benchmark's `--count-only` subscriber: plain sockets, each read by a thread of its own.
/// Until the session is connected the thread blocks in `recv_from` and passes everything on; from then on it
/// sleeps [`COUNT_NAP`] between drains of the socket and counts RTP right there (no copy, no channel). No epoll
/// registration and no sleeper on the socket: an arriving datagram wakes nobody, on the generator's core or in the
/// sender's `sendmsg` (on loopback the sender pays the receiver's wake-up; a real network would not bill it to
/// the server). Everything else (STUN, DTLS, RTCP) still goes to `tx`, at most one nap late. The threads end when
/// `stop` is set or `tx` is closed.
pub fn bind_udp_counting(
    ips: &[IpAddr],
    tx: mpsc::Sender<Datagram>,
    count: Arc<crate::sfu::SfuCounters>,
    stop: Arc<AtomicBool>,
) -> Result<Vec<(SocketAddr, Arc<std::net::UdpSocket>)>, crate::PeerError> {
    let io = |what: String| move |source| crate::PeerError::Io { what: what.clone(), source };
    let mut sockets = Vec::new();
    for &ip in ips {
        let sock =
            std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).map_err(io(format!("binding a UDP socket on {ip}")))?;
        let local = sock.local_addr().map_err(io("local_addr".into()))?;
        sock.set_read_timeout(Some(COUNT_READ_TIMEOUT)).map_err(io("SO_RCVTIMEO".into()))?;
        deepen_receive_buffer(&sock);
        let sock = Arc::new(sock);
        sockets.push((local, sock.clone()));
        let (tx, count, stop) = (tx.clone(), count.clone(), stop.clone());
        std::thread::Builder::new()
            .name("count-udp".into())
            .spawn(move || {
                let mut buf = vec![0u8; 2048];
                let mut napping = false;
                while !stop.load(Ordering::Relaxed) && !tx.is_closed() {
                    // From here on, nobody sleeps on the socket (a blocking read would: it times out only when
                    // nothing arrives). Sends on it already ignore a full buffer (`try_send_to`).
                    if !napping && count.connected.load(Ordering::Relaxed) {
                        napping = sock.set_nonblocking(true).is_ok();
                    }
                    match sock.recv_from(&mut buf) {
                        Ok((n, src)) => {
                            if count.connected.load(Ordering::Relaxed) && crate::sfu::is_rtp(&buf[..n]) {
                                count.rtp_received(n);
                            } else if tx.blocking_send((buf[..n].to_vec(), src, local)).is_err() {
                                return;
                            }
                        }
                        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                            if napping {
                                std::thread::sleep(COUNT_NAP);
                            }
                        }
                        // ICMP port-unreachable from a peer that went away shows up here on Linux: keep reading.
                        Err(e) => tracing::debug!("udp recv on {local}: {e}"),
                    }
                }
            })
            .map_err(io("starting the UDP reader thread".into()))?;
    }
    Ok(sockets)
}

/// File-name-safe version of a display name.
pub fn sanitize(name: &str) -> String {
    name.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_').take(32).collect()
}
