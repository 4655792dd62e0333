//! Reliable node-to-node links over a lossy channel (Redis pub/sub), sans-IO.
//!
//! Every message from node S to node R carries S's boot id and a sequence number of the S→R link. R delivers in
//! sequence order and drops duplicates; a gap (or a `K` saying more was sent than R has) makes R ask for a replay
//! from the first missing number (`N`). S keeps each message until R acknowledges it (`K`, cumulative), so a
//! message survives R's subscription dropping, Redis restarting empty or failing over. What S keeps is bounded in
//! bytes: past the bound [`Links::send`] refuses, and the caller tells the client.
//!
//! Wire (one pub/sub message each, on the receiver's channel):
//! - `Q\n<from>\n<boot>\n<seq>\n<body>`: a sequenced message;
//! - `K\n<from>\n<boot>\n<acked boot>\n<ack>\n<floor>\n<sent>`: "I have in order up to `ack` of what your boot
//!   `acked boot` sent me; you have acknowledged my messages up to `floor`; I have sent you up to `sent`";
//! - `N\n<from>\n<boot>\n<seq>`: "send me again from `seq`".

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often a link with unacknowledged messages (either way) reports its state.
pub const STATE_EVERY: Duration = Duration::from_millis(100);
/// A replay is not asked for (or done) again for the same gap sooner than this.
const REPLAY_EVERY: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the node's replay buffer is full ({bytes} of {limit} bytes): messages to other nodes wait for Redis")]
pub struct Full {
    pub bytes: usize,
    pub limit: usize,
}

#[derive(Default)]
struct Out {
    /// Last sequence number given out.
    sent: u64,
    /// Highest sequence number the receiver acknowledged.
    acked: u64,
    /// Unacknowledged messages (full payloads), in sequence order.
    buf: VecDeque<(u64, Arc<str>)>,
    last_state: Option<Instant>,
    last_replay: Option<(u64, Instant)>,
}

struct In {
    boot: String,
    /// Highest sequence number delivered in order.
    got: u64,
    /// `got` as last reported in a `K`.
    reported: u64,
    last_nack: Option<Instant>,
}

/// A sequenced message delivered in order (borrowed from the payload).
#[derive(Debug, PartialEq, Eq)]
pub struct Delivered<'a> {
    pub from: &'a str,
    pub body: &'a str,
}

pub struct Links {
    me: String,
    boot: String,
    out: HashMap<String, Out>,
    inn: HashMap<String, In>,
    bytes: usize,
    limit: usize,
    publish: VecDeque<(String, Arc<str>)>,
    /// When each node was last heard from.
    heard: HashMap<String, Instant>,
}

impl Links {
    /// `me`: this node's id; `boot`: unique per process (a restarted node starts new links); `limit`: bytes kept
    /// for replay at most.
    pub fn new(me: &str, boot: &str, limit: usize) -> Links {
        Links {
            me: me.to_owned(),
            boot: boot.to_owned(),
            out: HashMap::new(),
            inn: HashMap::new(),
            bytes: 0,
            limit,
            publish: VecDeque::new(),
            heard: HashMap::new(),
        }
    }

    /// Sends `body` to `node`, kept until acknowledged. `force` ignores the bound (for messages that must not be
    /// refused: returns and hand-overs, bounded by what others sent).
    pub fn send(&mut self, node: &str, body: &str, force: bool) -> Result<(), Full> {
        self.send_parts(node, &[body], force)
    }

    /// [`Links::send`] of the concatenation of `body`: the payload is written once, not assembled first.
    pub fn send_parts(&mut self, node: &str, body: &[&str], force: bool) -> Result<(), Full> {
        use std::fmt::Write;
        let seq = self.sent(node) + 1;
        let digits = seq.checked_ilog10().map_or(1, |d| d as usize + 1);
        let len = 5 + self.me.len() + self.boot.len() + digits + body.iter().map(|b| b.len()).sum::<usize>();
        if !force && self.bytes + len > self.limit {
            return Err(Full { bytes: self.bytes, limit: self.limit });
        }
        let mut payload = String::with_capacity(len);
        let _ = write!(payload, "Q\n{}\n{}\n{seq}\n", self.me, self.boot);
        body.iter().for_each(|b| payload.push_str(b));
        // Per message: no owned key unless the link is new.
        let o = match self.out.get_mut(node) {
            Some(o) => o,
            None => self.out.entry(node.to_owned()).or_default(),
        };
        o.sent = seq;
        debug_assert_eq!(payload.len(), len);
        self.bytes += payload.len();
        let payload: Arc<str> = Arc::from(payload);
        o.buf.push_back((seq, payload.clone()));
        self.publish.push_back((node.to_owned(), payload));
        Ok(())
    }

    /// Last sequence number given out on the link to `node`.
    pub fn sent(&self, node: &str) -> u64 {
        self.out.get(node).map_or(0, |o| o.sent)
    }

    /// Highest sequence number `node` acknowledged (everything it was sent, if the link is gone).
    pub fn acked(&self, node: &str) -> u64 {
        self.out.get(node).map_or(u64::MAX, |o| o.acked)
    }

    #[cfg(test)]
    fn buffered_bytes(&self) -> usize {
        self.bytes
    }

    /// When `node` was last heard from on its link.
    pub fn heard(&self, node: &str) -> Option<Instant> {
        self.heard.get(node).copied()
    }

    /// Nodes this node has links with.
    pub fn nodes(&self) -> impl Iterator<Item = &str> {
        self.out.keys().chain(self.inn.keys().filter(|k| !self.out.contains_key(*k))).map(String::as_str)
    }

    /// Drops the links with a node that is gone; returns how many unacknowledged messages died with it.
    pub fn forget(&mut self, node: &str) -> usize {
        self.inn.remove(node);
        self.heard.remove(node);
        let Some(o) = self.out.remove(node) else { return 0 };
        self.bytes -= o.buf.iter().map(|(_, p)| p.len()).sum::<usize>();
        o.buf.len()
    }

    /// Next payload to publish: (receiving node, payload).
    pub fn poll_publish(&mut self) -> Option<(String, Arc<str>)> {
        self.publish.pop_front()
    }

    /// One payload from this node's channel. `Some` for a sequenced message that is next in order.
    pub fn receive<'a>(&mut self, payload: &'a str, now: Instant) -> Option<Delivered<'a>> {
        let mut f = payload.splitn(5, '\n');
        let (kind, from, boot) = (f.next()?, f.next()?, f.next()?);
        match self.heard.get_mut(from) {
            Some(t) => *t = now,
            None => {
                self.heard.insert(from.to_owned(), now);
            }
        }
        match kind {
            "Q" => {
                let seq: u64 = f.next()?.parse().ok()?;
                let body = f.next()?;
                let i = self.inn.get_mut(from).filter(|i| i.boot == boot)?; // not yet in sync: wait for its `K`
                if seq == i.got + 1 {
                    i.got = seq;
                    return Some(Delivered { from, body });
                }
                if seq > i.got + 1 {
                    self.nack(from, now);
                }
                None
            }
            "K" => {
                let mut g = payload.split('\n').skip(3);
                let (acked_boot, ack, floor, sent) = (g.next()?, g.next()?, g.next()?, g.next()?);
                let (ack, floor, sent): (u64, u64, u64) = (ack.parse().ok()?, floor.parse().ok()?, sent.parse().ok()?);
                let i = self.inn.entry(from.to_owned()).or_insert_with(|| In {
                    boot: String::new(),
                    got: 0,
                    reported: 0,
                    last_nack: None,
                });
                if i.boot != boot {
                    // A new process (or the first contact): what it had acknowledged before is where we start.
                    *i = In { boot: boot.to_owned(), got: floor, reported: floor, last_nack: None };
                }
                let caught_up = i.got >= sent;
                if !caught_up {
                    self.nack(from, now);
                } else if acked_boot == self.boot {
                    // Applied only once everything it sent before this report has been handled here, so its
                    // replies to our messages (returns) are never overtaken by the acknowledgement.
                    if let Some(o) = self.out.get_mut(from) {
                        while o.buf.front().is_some_and(|(s, _)| *s <= ack) {
                            let (_, p) = o.buf.pop_front().expect("checked");
                            self.bytes -= p.len();
                        }
                        o.acked = o.acked.max(ack.min(o.sent));
                    }
                }
                None
            }
            "N" => {
                let seq: u64 = f.next()?.parse().ok()?;
                self.replay(from, seq, now);
                None
            }
            _ => None,
        }
    }

    fn nack(&mut self, from: &str, now: Instant) {
        let Some(i) = self.inn.get_mut(from) else { return };
        if i.last_nack.is_some_and(|t| now.duration_since(t) < REPLAY_EVERY) {
            return;
        }
        i.last_nack = Some(now);
        let payload = format!("N\n{}\n{}\n{}", self.me, self.boot, i.got + 1);
        self.publish.push_back((from.to_owned(), Arc::from(payload)));
    }

    fn replay(&mut self, to: &str, from_seq: u64, now: Instant) {
        let Some(o) = self.out.get_mut(to) else { return };
        if o.last_replay.is_some_and(|(s, t)| s == from_seq && now.duration_since(t) < REPLAY_EVERY) {
            return;
        }
        o.last_replay = Some((from_seq, now));
        for (_, p) in o.buf.iter().filter(|(s, _)| *s >= from_seq) {
            self.publish.push_back((to.to_owned(), p.clone()));
        }
    }

    /// Reports link state where something is unacknowledged; call about every [`STATE_EVERY`].
    pub fn tick(&mut self, now: Instant) {
        let nodes: Vec<String> = self.nodes().map(str::to_owned).collect();
        for node in nodes {
            let o = self.out.get(&node);
            let i = self.inn.get(&node);
            let unacked = o.is_some_and(|o| !o.buf.is_empty());
            let unreported = i.is_some_and(|i| i.got > i.reported);
            let last = o.and_then(|o| o.last_state);
            if !(unacked || unreported) || last.is_some_and(|t| now.duration_since(t) < STATE_EVERY) {
                continue;
            }
            let (acked_boot, ack) = i.map_or(("", 0), |i| (i.boot.as_str(), i.got));
            let (floor, sent) = o.map_or((0, 0), |o| (o.acked, o.sent));
            let payload = format!("K\n{}\n{}\n{acked_boot}\n{ack}\n{floor}\n{sent}", self.me, self.boot);
            self.publish.push_back((node.clone(), Arc::from(payload)));
            if let Some(i) = self.inn.get_mut(&node) {
                i.reported = i.got;
            }
            self.out.entry(node).or_default().last_state = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two nodes and a channel between them that loses what `drop` says.
    struct Pair {
        a: Links,
        b: Links,
        now: Instant,
        got_b: Vec<String>,
        got_a: Vec<String>,
    }

    impl Pair {
        fn new(limit: usize) -> Pair {
            Pair {
                a: Links::new("a", "a1", limit),
                b: Links::new("b", "b1", limit),
                now: Instant::now(),
                got_a: Vec::new(),
                got_b: Vec::new(),
            }
        }
        /// Moves everything published; `lose` decides per payload whether the channel drops it.
        fn pump(&mut self, mut lose: impl FnMut(&str) -> bool) {
            for _ in 0..50 {
                let mut moved = false;
                while let Some((to, p)) = self.a.poll_publish() {
                    assert_eq!(to, "b");
                    moved = true;
                    if !lose(&p) {
                        if let Some(d) = self.b.receive(&p, self.now) {
                            self.got_b.push(d.body.to_owned());
                        }
                    }
                }
                while let Some((to, p)) = self.b.poll_publish() {
                    assert_eq!(to, "a");
                    moved = true;
                    if !lose(&p) {
                        if let Some(d) = self.a.receive(&p, self.now) {
                            self.got_a.push(d.body.to_owned());
                        }
                    }
                }
                self.now += STATE_EVERY + REPLAY_EVERY;
                self.a.tick(self.now);
                self.b.tick(self.now);
                if !moved {
                    break;
                }
            }
        }
    }

    #[test]
    fn in_order_exactly_once_despite_loss_and_duplicates() {
        let mut p = Pair::new(1 << 20);
        p.pump(|_| false);
        let mut n = 0;
        for round in 0..20 {
            for _ in 0..10 {
                p.a.send("b", &format!("m{n}"), false).unwrap();
                n += 1;
            }
            // Lose every third payload of any kind in odd rounds (data, reports and replay requests alike).
            let mut k = 0;
            p.pump(|_| {
                k += 1;
                round % 2 == 1 && k % 3 == 0
            });
        }
        p.pump(|_| false);
        let want: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
        assert_eq!(p.got_b, want);
        assert_eq!(p.a.buffered_bytes(), 0, "everything acknowledged is released");
    }

    #[test]
    fn an_outage_loses_nothing_and_the_bound_refuses_clearly() {
        let mut p = Pair::new(600);
        p.pump(|_| false);
        let mut accepted = Vec::new();
        for i in 0..100 {
            match p.a.send("b", &format!("m{i}"), false) {
                Ok(()) => accepted.push(format!("m{i}")),
                Err(e) => assert_eq!(e.limit, 600),
            }
        }
        assert!(accepted.len() < 100 && !accepted.is_empty());
        p.pump(|_| true); // the channel is down
        assert!(p.got_b.is_empty());
        p.pump(|_| false); // and back
        assert_eq!(p.got_b, accepted);
        assert!(p.a.send("b", "after", false).is_ok(), "room again once acknowledged");
    }

    #[test]
    fn a_restarted_receiver_starts_where_the_old_one_stopped() {
        let mut p = Pair::new(1 << 20);
        p.a.send("b", "one", false).unwrap();
        p.pump(|_| false);
        assert_eq!(p.got_b, vec!["one"]);
        p.b = Links::new("b", "b2", 1 << 20);
        p.got_b.clear();
        p.a.send("b", "two", false).unwrap();
        p.pump(|_| false);
        assert_eq!(p.got_b, vec!["two"]);
        // And a restarted sender.
        p.a = Links::new("a", "a2", 1 << 20);
        p.a.send("b", "three", false).unwrap();
        p.pump(|_| false);
        assert_eq!(p.got_b, vec!["two", "three"]);
    }

    #[test]
    fn acknowledgements_wait_for_what_the_other_side_sent_first() {
        let mut p = Pair::new(1 << 20);
        p.a.send("b", "x", false).unwrap();
        p.pump(|_| false);
        // b answers (sequenced) and that answer is lost; b's report acknowledging "y" must not free "y" at a
        // before a has b's answer.
        p.a.send("b", "y", false).unwrap();
        let (_, y) = p.a.poll_publish().unwrap();
        p.b.receive(&y, p.now);
        p.b.send("a", "reply to y", false).unwrap();
        let _lost = p.b.poll_publish().unwrap();
        p.now += STATE_EVERY;
        p.b.tick(p.now);
        let (_, k) = p.b.poll_publish().unwrap();
        assert!(k.starts_with("K\n"));
        p.a.receive(&k, p.now);
        assert_eq!(p.a.acked("b"), 1, "not applied: a has not seen b's message 1 yet");
        p.pump(|_| false);
        assert_eq!(p.got_a, vec!["reply to y"]);
        assert_eq!(p.a.acked("b"), 2);
    }
}
