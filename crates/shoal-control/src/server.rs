//! The coordinator service.

use crate::proto::coordinator_server::{Coordinator as CoordinatorRpc, CoordinatorServer};
use crate::proto::*;
use crate::{Error, Result};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tonic::{Request, Response, Status};

/// Coordinator settings.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub token: String,
    /// Number of processes in the job.
    pub world: u32,
    /// A member silent for longer than this is declared failed.
    pub heartbeat_timeout: Duration,
    /// Registration and barriers fail if the job has not assembled within this.
    pub rendezvous_timeout: Duration,
    /// TLS on every connection, clients authenticated by the job CA (None: plain).
    pub tls: Option<crate::TlsPem>,
}

#[derive(Default)]
struct State {
    members: Vec<Member>,
    last_seen: Vec<Instant>,
    left: Vec<bool>,
    failed: Vec<Failure>,
    barriers: HashMap<String, u32>,
}

struct Service {
    cfg: CoordinatorConfig,
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
}

impl Service {
    fn check_token(&self, token: &str) -> std::result::Result<(), Status> {
        // Compared in time that does not depend on where a wrong token differs.
        let same = token.len() == self.cfg.token.len()
            && token
                .bytes()
                .zip(self.cfg.token.bytes())
                .fold(0u8, |a, (x, y)| a | (x ^ y))
                == 0;
        if !same {
            return Err(Status::unauthenticated("wrong job token"));
        }
        Ok(())
    }

    fn failure(&self) -> Option<Status> {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.failed
            .first()
            .map(|f| Status::aborted(format!("rank {} failed: {}", f.rank, f.reason)))
    }

    /// Waits (re-checking on every change) until `done` holds, a member fails, or the
    /// rendezvous timeout passes.
    async fn wait_until(
        &self,
        what: &str,
        done: impl Fn(&State) -> bool,
    ) -> std::result::Result<(), Status> {
        let deadline = tokio::time::Instant::now() + self.cfg.rendezvous_timeout;
        loop {
            let notified = self.changed.notified();
            {
                let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                if done(&st) {
                    return Ok(());
                }
            }
            if let Some(f) = self.failure() {
                return Err(f);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                return Err(Status::deadline_exceeded(format!(
                    "{what}: {} of {} processes after {:?}",
                    st.members.len(),
                    self.cfg.world,
                    self.cfg.rendezvous_timeout
                )));
            }
        }
    }
}

#[tonic::async_trait]
impl CoordinatorRpc for Service {
    async fn register(
        &self,
        req: Request<RegisterRequest>,
    ) -> std::result::Result<Response<RegisterReply>, Status> {
        let r = req.into_inner();
        self.check_token(&r.token)?;
        let rank = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if st.members.len() as u32 >= self.cfg.world {
                return Err(Status::resource_exhausted(format!(
                    "the job already has its {} processes",
                    self.cfg.world
                )));
            }
            let rank = st.members.len() as u32;
            st.members.push(Member {
                rank,
                role: r.role,
                host: r.host,
                data_addr: r.data_addr,
                index: r.index,
            });
            st.last_seen.push(Instant::now());
            st.left.push(false);
            rank
        };
        self.changed.notify_waiters();
        let world = self.cfg.world as usize;
        self.wait_until("rendezvous", |st| st.members.len() >= world)
            .await?;
        let members = self
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .members
            .clone();
        Ok(Response::new(RegisterReply {
            rank,
            members,
            heartbeat_ms: (self.cfg.heartbeat_timeout.as_millis() / 4).max(1) as u64,
        }))
    }

    async fn barrier(
        &self,
        req: Request<BarrierRequest>,
    ) -> std::result::Result<Response<BarrierReply>, Status> {
        let r = req.into_inner();
        self.check_token(&r.token)?;
        let world = self.cfg.world;
        {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if r.rank as usize >= st.members.len() {
                return Err(Status::invalid_argument(format!("unknown rank {}", r.rank)));
            }
            *st.barriers.entry(r.name.clone()).or_insert(0) += 1;
        }
        self.changed.notify_waiters();
        let name = r.name.clone();
        self.wait_until(&format!("barrier '{}'", r.name), move |st| {
            st.barriers.get(&name).copied().unwrap_or(0) >= world
        })
        .await?;
        Ok(Response::new(BarrierReply {}))
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> std::result::Result<Response<HeartbeatReply>, Status> {
        let r = req.into_inner();
        self.check_token(&r.token)?;
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let i = r.rank as usize;
        if i >= st.members.len() {
            return Err(Status::invalid_argument(format!("unknown rank {}", r.rank)));
        }
        st.last_seen[i] = Instant::now();
        Ok(Response::new(HeartbeatReply {
            failed: st.failed.clone(),
        }))
    }

    async fn leave(
        &self,
        req: Request<LeaveRequest>,
    ) -> std::result::Result<Response<LeaveReply>, Status> {
        let r = req.into_inner();
        self.check_token(&r.token)?;
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = st.left.get_mut(r.rank as usize) {
            *l = true;
        }
        Ok(Response::new(LeaveReply {}))
    }
}

/// A running coordinator (its own thread and runtime); stops when dropped.
pub struct Coordinator {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    state: Arc<Mutex<State>>,
    world: u32,
    rendezvous_timeout: Duration,
}

impl Coordinator {
    /// Starts serving on `addr` (port 0 picks a free port; see [`Coordinator::addr`]).
    pub fn start(addr: SocketAddr, cfg: CoordinatorConfig) -> Result<Self> {
        if cfg.token.is_empty() {
            return Err(Error::Status(
                "the job token is empty: a coordinator serves only processes that present one"
                    .into(),
            ));
        }
        let (world, rendezvous_timeout) = (cfg.world, cfg.rendezvous_timeout);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| Error::Transport {
                what: "starting the coordinator runtime".into(),
                why: e.to_string(),
            })?;
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(addr))
            .map_err(|e| Error::Transport {
                what: format!("binding the coordinator to {addr}"),
                why: e.to_string(),
            })?;
        let local = listener.local_addr().map_err(|e| Error::Transport {
            what: "reading the coordinator address".into(),
            why: e.to_string(),
        })?;
        // HTTP/2 pings find a connection whose member is gone without closing it.
        let plain = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(cfg.heartbeat_timeout))
            .http2_keepalive_timeout(Some(cfg.heartbeat_timeout));
        let mut builder = match &cfg.tls {
            Some(t) => crate::tls::server(plain, t)?,
            None => plain,
        };
        let state = Arc::new(Mutex::new(State::default()));
        let changed = Arc::new(Notify::new());
        let svc = Service {
            cfg: cfg.clone(),
            state: state.clone(),
            changed: changed.clone(),
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let watch_state = state.clone();
        let thread = std::thread::spawn(move || {
            rt.block_on(async move {
                // Failure detector: members silent past the timeout are failed.
                let detector = tokio::spawn(async move {
                    let period = (cfg.heartbeat_timeout / 4).max(Duration::from_millis(5));
                    loop {
                        tokio::time::sleep(period).await;
                        let mut st = watch_state.lock().unwrap_or_else(|p| p.into_inner());
                        let now = Instant::now();
                        let mut newly = Vec::new();
                        for i in 0..st.members.len() {
                            let silent = now.duration_since(st.last_seen[i]);
                            let known = st.failed.iter().any(|f| f.rank as usize == i);
                            if !st.left[i] && !known && silent > cfg.heartbeat_timeout {
                                newly.push(Failure {
                                    rank: i as u32,
                                    reason: format!(
                                        "no heartbeat for {silent:?} (timeout {:?})",
                                        cfg.heartbeat_timeout
                                    ),
                                });
                            }
                        }
                        if !newly.is_empty() {
                            st.failed.extend(newly);
                            drop(st);
                            changed.notify_waiters();
                        }
                    }
                });
                let incoming = crate::gate::incoming(listener, world as usize);
                let _ = builder
                    .add_service(CoordinatorServer::new(svc))
                    .serve_with_incoming_shutdown(incoming, async {
                        let _ = rx.await;
                    })
                    .await;
                detector.abort();
            });
        });
        Ok(Self {
            addr: local,
            stop: Some(tx),
            thread: Some(thread),
            state,
            world,
            rendezvous_timeout,
        })
    }

    /// Blocks until the job is over: `Ok` once every member has registered and left in
    /// order; an error naming the member if one fails, or if the job has not assembled
    /// within the rendezvous timeout.
    pub fn wait_finished(&self) -> Result<()> {
        let start = Instant::now();
        loop {
            {
                let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(f) = st.failed.first() {
                    let who = st
                        .members
                        .get(f.rank as usize)
                        .map(|m| format!("{} (rank {}, host {})", m.role, f.rank, m.host))
                        .unwrap_or_else(|| format!("rank {}", f.rank));
                    return Err(Error::PeerFailed {
                        rank: f.rank,
                        reason: format!("{who}: {}", f.reason),
                    });
                }
                let all = st.members.len() as u32 >= self.world;
                if all && st.left.iter().all(|&l| l) {
                    return Ok(());
                }
                if !all && start.elapsed() > self.rendezvous_timeout {
                    return Err(Error::Status(format!(
                        "rendezvous: {} of {} processes after {:?}",
                        st.members.len(),
                        self.world,
                        self.rendezvous_timeout
                    )));
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Members declared failed so far.
    pub fn failures(&self) -> Vec<(u32, String)> {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.failed
            .iter()
            .map(|f| (f.rank, f.reason.clone()))
            .collect()
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        // The server drains its connections before it stops; one to a member that is
        // gone without closing it (a host cut off) would hold it for ever, so the wait
        // is bounded and the rest is left to the process's end.
        if let Some(t) = self.thread.take() {
            let until = Instant::now() + DRAIN;
            while !t.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(10));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

/// How long a stopping coordinator waits for its connections to close.
const DRAIN: Duration = Duration::from_secs(2);
