//! `tern ctl conns`: how many of a worker's connections are in each [`ConnState`], counted by
//! the worker itself from its own connection table when the control thread asks.
//!
//! The census is a request and an answer, not gauges kept on every transition: the control
//! thread bumps a worker's [`Tally::ask`] ticket; the worker, once per tick (100 ms, in
//! [`super::Table::expire`], on both paths), sees the ticket moved, walks its table once,
//! classifies each entry ([`Conn::state`]) and publishes the counts with the ticket it
//! answered. So the data path pays nothing per packet or per state change (one relaxed load per
//! tick), and the counts are exact by construction: they come from one walk of the table at
//! one instant, with nothing to keep balanced across the many places a connection's state
//! moves (or that a later change adds). The price is latency: an answer takes up to a tick,
//! and a worker that is not ticking (stopped, or wedged) does not answer; the reader waits a
//! bounded time ([`ANSWER_WITHIN`]) and says which workers did not answer.
//!
//! Not here: what the states mean for the machine ([`Conn`]); the command's text rendering
//! (`control::text`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{Conn, Flow, Leg};
use crate::proxy::Stage;

/// How long a reader waits for every worker's answer (a worker answers within a tick).
pub const ANSWER_WITHIN: Duration = Duration::from_secs(2);

/// What an operator sees of a connection. The order is a connection's usual life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// The TLS handshake is in progress (from accept; a connection that sent nothing yet).
    Handshake,
    /// The handshake is done, no backend leg yet: `backend.connect = "first-byte"` waits for
    /// the client's first plaintext byte.
    Waiting,
    /// A backend connect is in flight (failover included).
    Connecting,
    /// Connected to a backend, both directions open.
    Proxying,
    /// One direction (or both) has finished and the rest is still moving, or tern is closing
    /// the client's side politely (a TLS error's alert, or no backend: close_notify and FIN).
    HalfClosed,
    /// Over: both legs are closing (FIN or RST) and the entry waits for the operations still
    /// in flight on them.
    Closing,
}

impl ConnState {
    pub const ALL: [ConnState; 6] = [
        ConnState::Handshake,
        ConnState::Waiting,
        ConnState::Connecting,
        ConnState::Proxying,
        ConnState::HalfClosed,
        ConnState::Closing,
    ];

    /// Its name in `tern ctl conns` (JSON keys and the text table's columns).
    pub fn name(self) -> &'static str {
        match self {
            ConnState::Handshake => "handshake",
            ConnState::Waiting => "waiting",
            ConnState::Connecting => "connecting",
            ConnState::Proxying => "proxying",
            ConnState::HalfClosed => "half_closed",
            ConnState::Closing => "closing",
        }
    }
}

impl Conn {
    /// Its [`ConnState`]; `closing`: the table entry is torn down (`Entry::closing`).
    pub fn state(&self, closing: bool) -> ConnState {
        if closing || self.end.is_some() {
            return ConnState::Closing;
        }
        let stage = self.session.stage();
        if stage == Stage::Failed || self.leg == Leg::Failed {
            return ConnState::HalfClosed;
        }
        if stage == Stage::Handshake {
            return ConnState::Handshake;
        }
        let client_done = self.client_in == Flow::Finished
            || self.client_out == Flow::Finished
            || self.session.client_finished();
        match self.leg {
            _ if client_done => ConnState::HalfClosed,
            Leg::Idle => ConnState::Waiting,
            Leg::Connecting { .. } => ConnState::Connecting,
            Leg::Connected {
                write: Flow::Open,
                read: Flow::Open,
                ..
            } => ConnState::Proxying,
            Leg::Connected { .. } | Leg::Failed => ConnState::HalfClosed,
        }
    }
}

/// Connections per [`ConnState`] (one worker's, or a sum).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub handshake: u64,
    pub waiting: u64,
    pub connecting: u64,
    pub proxying: u64,
    pub half_closed: u64,
    pub closing: u64,
    /// All of the above.
    pub total: u64,
}

impl Counts {
    pub fn add(&mut self, state: ConnState) {
        *self.get_mut(state) += 1;
        self.total += 1;
    }

    pub fn get(&self, state: ConnState) -> u64 {
        match state {
            ConnState::Handshake => self.handshake,
            ConnState::Waiting => self.waiting,
            ConnState::Connecting => self.connecting,
            ConnState::Proxying => self.proxying,
            ConnState::HalfClosed => self.half_closed,
            ConnState::Closing => self.closing,
        }
    }

    fn get_mut(&mut self, state: ConnState) -> &mut u64 {
        match state {
            ConnState::Handshake => &mut self.handshake,
            ConnState::Waiting => &mut self.waiting,
            ConnState::Connecting => &mut self.connecting,
            ConnState::Proxying => &mut self.proxying,
            ConnState::HalfClosed => &mut self.half_closed,
            ConnState::Closing => &mut self.closing,
        }
    }
}

impl std::ops::AddAssign for Counts {
    fn add_assign(&mut self, o: Counts) {
        for state in ConnState::ALL {
            *self.get_mut(state) += o.get(state);
        }
        self.total += o.total;
    }
}

/// One worker's end of the census: tickets asked by readers, the ticket last answered and
/// the counts of that answer.
#[derive(Debug)]
pub struct Tally {
    /// `"kernel"` or `"bypass"`.
    pub path: &'static str,
    pub worker: usize,
    /// The latest ticket handed to a reader. Only readers write it.
    asked: AtomicU64,
    /// The ticket the published counts answer: counted after that ticket was asked. Only the
    /// worker writes it, after the counts (Release), so a reader that sees its ticket here
    /// (Acquire) reads counts at least that new.
    answered: AtomicU64,
    /// Taken by the worker once per answer and by a reader for a copy: never per packet.
    counts: Mutex<Counts>,
}

impl Tally {
    fn new(path: &'static str, worker: usize) -> Tally {
        Tally {
            path,
            worker,
            asked: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            counts: Mutex::new(Counts::default()),
        }
    }

    /// Worker side, once per tick: when a reader asked since the last answer, counts with
    /// `count` and publishes. Otherwise one load.
    pub fn answer(&self, count: impl FnOnce() -> Counts) {
        let asked = self.asked.load(Ordering::Acquire);
        if asked == self.answered.load(Ordering::Relaxed) {
            return;
        }
        let counts = count();
        *self.counts.lock().unwrap_or_else(PoisonError::into_inner) = counts;
        self.answered.store(asked, Ordering::Release);
    }

    /// Reader side: a ticket for a count made from now on.
    pub fn ask(&self) -> u64 {
        self.asked.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// The counts once the worker has answered `ticket` (or a later one).
    pub fn answered(&self, ticket: u64) -> Option<Counts> {
        (self.answered.load(Ordering::Acquire) >= ticket)
            .then(|| *self.counts.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// Every worker's [`Tally`], both paths, in registration order.
#[derive(Debug, Default)]
pub struct Census {
    workers: Mutex<Vec<Arc<Tally>>>,
}

/// One worker's answer (`counts: None`: no answer within [`ANSWER_WITHIN`]).
#[derive(Debug, Clone, Serialize)]
pub struct WorkerCounts {
    pub path: &'static str,
    pub worker: usize,
    pub counts: Option<Counts>,
}

impl Census {
    /// A worker's tally (each worker registers once, when it builds its table).
    pub fn register(&self, path: &'static str, worker: usize) -> Arc<Tally> {
        let tally = Arc::new(Tally::new(path, worker));
        self.workers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(tally.clone());
        tally
    }

    /// Asks every worker and waits (at most `within`, polling) for their answers.
    pub fn count(&self, within: Duration) -> Vec<WorkerCounts> {
        let workers = self
            .workers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let tickets: Vec<u64> = workers.iter().map(|t| t.ask()).collect();
        let deadline = Instant::now() + within;
        let mut answers: Vec<Option<Counts>> = vec![None; workers.len()];
        loop {
            for ((tally, ticket), answer) in workers.iter().zip(&tickets).zip(&mut answers) {
                if answer.is_none() {
                    *answer = tally.answered(*ticket);
                }
            }
            if answers.iter().all(Option::is_some) || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        workers
            .iter()
            .zip(answers)
            .map(|(t, counts)| WorkerCounts {
                path: t.path,
                worker: t.worker,
                counts,
            })
            .collect()
    }
}

/// The `conns` document: each worker's counts, the sums per path and the total.
pub fn document(workers: &[WorkerCounts]) -> serde_json::Value {
    let mut total = Counts::default();
    let mut paths: Vec<(&'static str, Counts)> = Vec::new();
    for w in workers {
        let Some(c) = w.counts else { continue };
        total += c;
        match paths.iter_mut().find(|(p, _)| *p == w.path) {
            Some((_, sum)) => *sum += c,
            None => paths.push((w.path, c)),
        }
    }
    let paths: serde_json::Map<String, serde_json::Value> = paths
        .into_iter()
        .map(|(p, c)| (p.to_string(), serde_json::json!(c)))
        .collect();
    let unanswered = workers.iter().filter(|w| w.counts.is_none()).count();
    serde_json::json!({
        "total": total,
        "paths": paths,
        "workers": workers,
        "unanswered": unanswered,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_is_answered_only_by_a_count_made_after_it() {
        let census = Census::default();
        let tally = census.register("kernel", 0);
        let mut counts = Counts::default();
        counts.add(ConnState::Proxying);
        // Nobody asked: the worker does not count.
        tally.answer(|| panic!("counted without a request"));
        let ticket = tally.ask();
        assert_eq!(tally.answered(ticket), None, "not answered yet");
        tally.answer(|| counts);
        assert_eq!(tally.answered(ticket), Some(counts));
        // Answered once: the next tick does not count again.
        tally.answer(|| panic!("counted twice for one request"));
        let later = tally.ask();
        assert_eq!(
            tally.answered(later),
            None,
            "an old answer is not a new one"
        );
    }

    #[test]
    fn a_worker_that_does_not_answer_is_named_and_not_summed() {
        let census = Census::default();
        let answering = census.register("kernel", 0);
        let _silent = census.register("bypass", 3);
        let worker = std::thread::spawn(move || {
            let mut counts = Counts::default();
            counts.add(ConnState::Handshake);
            counts.add(ConnState::Closing);
            // A tick every 10 ms for at most 2 s.
            for _ in 0..200 {
                answering.answer(|| counts);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        let answers = census.count(Duration::from_millis(300));
        assert_eq!(answers.len(), 2);
        assert_eq!(answers[0].counts.map(|c| c.total), Some(2));
        assert_eq!((answers[1].path, answers[1].worker), ("bypass", 3));
        assert_eq!(answers[1].counts, None);
        let doc = document(&answers);
        assert_eq!(doc["total"]["handshake"], 1);
        assert_eq!(doc["total"]["total"], 2);
        assert_eq!(doc["paths"]["kernel"]["closing"], 1);
        assert!(doc["paths"].get("bypass").is_none(), "{doc}");
        assert_eq!(doc["unanswered"], 1);
        assert!(doc["workers"][1]["counts"].is_null(), "{doc}");
        worker.join().expect("worker");
    }
}
