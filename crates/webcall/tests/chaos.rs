//! Chaos: two peers on different nodes relay numbered messages both ways while Redis is paused for 10 s, its
//! clients are killed (`CLIENT KILL`), it is killed and restarted empty, and a third node is killed with `kill -9`.
//! Every accepted message arrives exactly once and in order, nobody is reset, and the third node's peer is seen to
//! leave (`bye`), as docs/cluster.md states. Real `redis-server` and `webcall serve` processes on loopback.

use webcall_testkit as common;
use webcall_testkit::redis;

use common::{read_server_frame, Client, ServerProc};
use futures_util::{SinkExt, StreamExt};
use redis::Redis;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;
use webcall_protocol::{ErrorCode, Join, ServerMessage as M, Signal};

fn node(url: &str, id: &str) -> ServerProc {
    // Short TTL: the failover and the kill -9 are noticed within seconds.
    ServerProc::start(&["--redis", url, "--node-id", id, "--node-ttl", "1s", "--rate-limit", "2000"])
}

/// What one side saw: the numbered messages from the other, everything else, and how it ended.
#[derive(Default, Debug)]
struct Seen {
    numbers: Vec<u64>,
    others: Vec<M>,
    ended: Option<String>,
}

/// Sends `offer`s numbered 0.. to `to` every 5 ms until `stop`, and records what arrives; returns (sent, seen).
fn run(c: Client, to: String, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(u64, Seen)> {
    tokio::spawn(async move {
        let (mut tx, mut rx) = c.ws.split();
        let send = async {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                if tx.send(Message::text(Signal::Offer(n.to_string()).to_json(&to))).await.is_err() {
                    break; // the receiving half reports how the connection ended
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (n, tx)
        };
        let recv = async {
            let mut seen = Seen::default();
            // Reads until the other side has been quiet for a while after the stop.
            loop {
                let next = tokio::time::timeout(Duration::from_secs(20), rx.next()).await;
                match next {
                    Ok(Some(Ok(Message::Text(t)))) => match read_server_frame(&t) {
                        M::Offer { sdp, .. } if sdp == "end" => return seen,
                        M::Offer { sdp, .. } => seen.numbers.push(sdp.parse().unwrap()),
                        other => seen.others.push(other),
                    },
                    Ok(Some(Ok(Message::Close(f)))) => {
                        seen.ended = Some(format!("{f:?}"));
                        return seen;
                    }
                    Ok(Some(Ok(_))) => {}
                    Ok(Some(Err(e))) => {
                        seen.ended = Some(e.to_string());
                        return seen;
                    }
                    Ok(None) => {
                        seen.ended = Some("dropped".into());
                        return seen;
                    }
                    Err(_) => {
                        seen.ended = Some("no end marker within 20 s".into());
                        return seen;
                    }
                }
            }
        };
        let send_then_mark = async {
            let (n, mut tx) = send.await;
            // The end marker goes the same way, so it arrives after everything before it.
            let _ = tx.send(Message::text(Signal::Offer("end".into()).to_json(&to))).await;
            n
        };
        let (n, seen) = tokio::join!(send_then_mark, recv);
        (n, seen)
    })
}

async fn phase(what: &str, d: Duration) {
    eprintln!("chaos: {what}");
    tokio::time::sleep(d).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_messages_survive_redis_pauses_kills_and_restarts() {
    let mut redis = Redis::start_outside_ephemeral();
    let (port, url) = (redis.port, redis.url());
    let (n1, n2, mut n3) = (node(&url, "n1"), node(&url, "n2"), node(&url, "n3"));
    let (a, _) = Client::join(&n1.ws_url(), "chaos", "A").await;
    let (mut b, _) = Client::join(&n2.ws_url(), "chaos", "B").await;
    let (_c, _) = Client::join(&n3.ws_url(), "chaos", "C").await;
    let (a_id, b_id) = (a.id.clone(), b.id.clone());
    // B has seen C join; A saw B and C.
    let M::Hello { from: c_id, .. } = b.expect("hello").await else { unreachable!() };
    let mut a = a;
    a.expect("hello").await;
    a.expect("hello").await;

    let stop = Arc::new(AtomicBool::new(false));
    let ta = run(a, b_id.clone(), stop.clone());
    let tb = run(b, a_id.clone(), stop.clone());

    phase("steady", Duration::from_secs(1)).await;
    redis.signal("STOP");
    phase("Redis paused (SIGSTOP) for 10 s", Duration::from_secs(10)).await;
    redis.signal("CONT");
    phase("Redis continued", Duration::from_secs(2)).await;
    let killed = redis.command("CLIENT KILL TYPE pubsub");
    let killed2 = redis.command("CLIENT KILL TYPE normal SKIPME yes");
    phase(&format!("CLIENT KILL: {killed} pubsub, {killed2} normal"), Duration::from_secs(2)).await;
    redis.stop();
    phase("Redis killed; down for 3 s", Duration::from_secs(3)).await;
    let _redis = Redis::start_on(port);
    phase("Redis restarted empty", Duration::from_secs(3)).await;
    n3.kill();
    phase("n3 killed with SIGKILL", Duration::from_secs(3)).await;
    stop.store(true, Ordering::SeqCst);

    let (sent_a, seen_a) = ta.await.unwrap();
    let (sent_b, seen_b) = tb.await.unwrap();
    eprintln!(
        "chaos: A sent {sent_a}, B got {}; B sent {sent_b}, A got {}",
        seen_b.numbers.len(),
        seen_a.numbers.len()
    );
    for (who, sent, seen) in [("B", sent_a, &seen_b), ("A", sent_b, &seen_a)] {
        assert_eq!(seen.ended, None, "{who}'s connection was not reset");
        let want: Vec<u64> = (0..sent).collect();
        assert!(
            seen.numbers == want,
            "{who} got every accepted message once, in order: {:?}",
            first_difference(&seen.numbers, &want)
        );
        let errors: Vec<&M> = seen.others.iter().filter(|m| m.message_type() == "error").collect();
        assert!(errors.is_empty(), "{who} was told nothing false: {errors:?}");
        // The killed node's peer leaves (its client's session died with it); nobody else comes or goes.
        let byes: Vec<&M> = seen.others.iter().filter(|m| m.message_type() == "bye").collect();
        assert_eq!(byes, [&M::Bye { from: c_id.clone() }], "{who}: {:?}", seen.others);
    }
    // And the cluster works for newcomers: A and B are still members everywhere.
    let (_d, w) = Client::join(&n1.ws_url(), "chaos", "D").await;
    let mut ids: Vec<String> = common::msg::peers(w).into_iter().map(|p| p.id).collect();
    ids.sort();
    let mut want = vec![a_id, b_id];
    want.sort();
    assert_eq!(ids, want);
    drop(n2);
}

fn first_difference(got: &[u64], want: &[u64]) -> String {
    let i = got.iter().zip(want).position(|(g, w)| g != w).unwrap_or(got.len().min(want.len()));
    format!(
        "{} of {} received; first difference at index {i}: got {:?}, want {:?}",
        got.len(),
        want.len(),
        got.get(i),
        want.get(i)
    )
}

/// A Sentinel-managed Redis: primary, replica and three sentinels. The primary is killed mid-call; the nodes
/// follow the promoted replica, the call's messages all arrive in order, and new joins work again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_follow_a_sentinel_failover_without_losing_or_resetting() {
    let mut primary = Redis::start();
    let replica = Redis::start_with(redis::free_port(), &["--replicaof", "127.0.0.1", &primary.port.to_string()]);
    redis::wait_until("the replica is in sync", Duration::from_secs(10), || {
        replica.command_info("replication").contains("master_link_status:up")
    });
    let sentinels: Vec<redis::Sentinel> = (0..3).map(|_| redis::Sentinel::start(primary.port, 2)).collect();
    redis::wait_until("the sentinels know each other and the replica", Duration::from_secs(20), || {
        sentinels.iter().all(|s| {
            redis::command(s.port, "SENTINEL ckquorum mymaster").starts_with("+OK 3")
                && redis::command_reply(s.port, "SENTINEL replicas mymaster").contains(&replica.port.to_string())
        })
    });
    let hosts: Vec<String> = sentinels.iter().map(|s| format!("127.0.0.1:{}", s.port)).collect();
    let url = format!("redis+sentinel://{}/mymaster", hosts.join(","));
    let (n1, n2) = (node(&url, "n1"), node(&url, "n2"));
    let (mut a, _) = Client::join(&n1.ws_url(), "fo", "A").await;
    let (b, _) = Client::join(&n2.ws_url(), "fo", "B").await;
    a.expect("hello").await;
    let (a_id, b_id) = (a.id.clone(), b.id.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let ta = run(a, b_id.clone(), stop.clone());
    let tb = run(b, a_id.clone(), stop.clone());

    phase("steady", Duration::from_secs(1)).await;
    primary.stop();
    let killed = std::time::Instant::now();
    eprintln!("chaos: primary killed");
    let promoted = replica.port.to_string();
    let s0 = sentinels[0].port;
    tokio::task::spawn_blocking(move || {
        redis::wait_until("a sentinel promotes the replica", Duration::from_secs(30), || {
            redis::command_reply(s0, "SENTINEL get-master-addr-by-name mymaster").contains(&promoted)
        })
    })
    .await
    .unwrap();
    eprintln!("chaos: replica promoted after {:?}", killed.elapsed());
    // New joins work again once the nodes found the new primary (refused with `unavailable` meanwhile).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut c = Client::connect(&n1.ws_url()).await;
    let w = loop {
        c.send_join(Join::new("fo", "C")).await;
        let m = c.recv().await;
        if m.message_type() == "welcome" {
            break m;
        }
        let code = m.clone().into_refusal().and_then(Result::ok).map(|e| e.code);
        assert_eq!(code, Some(ErrorCode::Unavailable), "{m:?}");
        assert!(std::time::Instant::now() < deadline, "joins still refused after the failover");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("chaos: first join after the kill: {:?}", killed.elapsed());
    let mut ids: Vec<String> = common::msg::peers(w).into_iter().map(|p| p.id).collect();
    ids.sort();
    let mut want = vec![a_id, b_id];
    want.sort();
    assert_eq!(ids, want, "the call's peers are members on the new primary");
    phase("after the failover", Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    let (sent_a, seen_a) = ta.await.unwrap();
    let (sent_b, seen_b) = tb.await.unwrap();
    eprintln!(
        "chaos: A sent {sent_a}, B got {}; B sent {sent_b}, A got {}",
        seen_b.numbers.len(),
        seen_a.numbers.len()
    );
    for (who, sent, seen) in [("B", sent_a, &seen_b), ("A", sent_b, &seen_a)] {
        assert_eq!(seen.ended, None, "{who}'s connection was not reset");
        let want: Vec<u64> = (0..sent).collect();
        assert!(
            seen.numbers == want,
            "{who} got every accepted message once, in order: {}",
            first_difference(&seen.numbers, &want)
        );
        let unexpected: Vec<&M> = seen.others.iter().filter(|m| m.message_type() != "hello").collect();
        assert!(unexpected.is_empty(), "{who}: nobody left, nothing was refused: {unexpected:?}");
    }
}
