//! A blocking client for the coordinator (it runs its own small runtime), with a
//! background heartbeat that records failures of other members.

use crate::proto::coordinator_client::CoordinatorClient;
use crate::proto::*;
use crate::{Error, Result};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What registration returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub rank: u32,
    /// Every member, in rank order.
    pub members: Vec<Member>,
    pub heartbeat: Duration,
}

/// One process's connection to the coordinator.
pub struct ControlClient {
    rt: tokio::runtime::Runtime,
    client: CoordinatorClient<tonic::transport::Channel>,
    token: String,
    rank: u32,
    failure: Arc<Mutex<Option<(u32, String)>>>,
    beat: Option<tokio::task::JoinHandle<()>>,
}

/// What a process tells the coordinator when it joins.
#[derive(Debug, Clone, Default)]
pub struct Joining {
    pub role: String,
    pub host: String,
    pub data_addr: String,
    /// Its index within its role (a pod's completion or task index), if it has one.
    pub index: Option<u32>,
}

impl ControlClient {
    /// Connects to the coordinator at `addr` (`http://host:port`) and registers; returns
    /// when the whole job has registered.
    pub fn register(
        addr: &str,
        token: &str,
        role: &str,
        host: &str,
        data_addr: &str,
    ) -> Result<(Self, Registration)> {
        let mut c = Self::connect(addr, token, Duration::ZERO, None)?;
        let reg = c.join(&Joining {
            role: role.into(),
            host: host.into(),
            data_addr: data_addr.into(),
            index: None,
        })?;
        Ok((c, reg))
    }

    /// Connects to the coordinator at `addr`, retrying for up to `wait` while it cannot
    /// be reached (on a cluster, processes start in any order and the coordinator's
    /// name may not resolve yet); the first failed attempt says so on stderr
    /// (`the coordinator at ADDR is not reachable yet ...; retrying`). With `tls`, the
    /// connection is TLS, both sides authenticated by the job CA. Does not register:
    /// see [`ControlClient::join`].
    pub fn connect(
        addr: &str,
        token: &str,
        wait: Duration,
        tls: Option<&crate::TlsPem>,
    ) -> Result<Self> {
        if token.is_empty() {
            return Err(Error::Status(format!(
                "the job token for {addr} is empty (set SHOAL_JOB_TOKEN)"
            )));
        }
        // One worker thread drives the connection and the heartbeat task, whatever the
        // calling thread is doing.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| Error::Transport {
                what: "starting the control client runtime".into(),
                why: e.to_string(),
            })?;
        let deadline = std::time::Instant::now() + wait;
        let mut told = false;
        let endpoint = match tls {
            Some(t) => crate::tls::endpoint(addr, t)?,
            None => tonic::transport::Endpoint::from_shared(addr.to_string()).map_err(|e| {
                Error::Transport {
                    what: format!("the coordinator address {addr}"),
                    why: error_chain(&e),
                }
            })?,
        };
        let client = loop {
            match rt.block_on(endpoint.connect()).map(CoordinatorClient::new) {
                Ok(c) => break c,
                Err(e) if std::time::Instant::now() >= deadline => {
                    return Err(Error::Transport {
                        what: format!("connecting to the coordinator at {addr} (waited {wait:?})"),
                        why: error_chain(&e),
                    })
                }
                Err(e) => {
                    if !told {
                        eprintln!(
                            "the coordinator at {addr} is not reachable yet ({}); retrying for up to {wait:?}",
                            error_chain(&e)
                        );
                        told = true;
                    }
                    std::thread::sleep(Duration::from_millis(250))
                }
            }
        };
        Ok(Self {
            rt,
            client,
            token: token.into(),
            rank: u32::MAX,
            failure: Arc::new(Mutex::new(None)),
            beat: None,
        })
    }

    /// Registers this process; returns once the whole job has registered, and keeps
    /// heartbeating from then on.
    pub fn join(&mut self, j: &Joining) -> Result<Registration> {
        let reply = self
            .rt
            .block_on(self.client.register(RegisterRequest {
                token: self.token.clone(),
                role: j.role.clone(),
                host: j.host.clone(),
                data_addr: j.data_addr.clone(),
                index: j.index,
            }))?
            .into_inner();
        let reg = Registration {
            rank: reply.rank,
            members: reply.members,
            heartbeat: Duration::from_millis(reply.heartbeat_ms),
        };
        self.rank = reg.rank;
        self.start_heartbeat(reg.heartbeat);
        Ok(reg)
    }

    fn start_heartbeat(&mut self, every: Duration) {
        let mut client = self.client.clone();
        let (token, rank) = (self.token.clone(), self.rank);
        let failure = self.failure.clone();
        self.beat = Some(self.rt.spawn(async move {
            loop {
                let r = client
                    .heartbeat(HeartbeatRequest {
                        token: token.clone(),
                        rank,
                    })
                    .await;
                {
                    let mut f = failure.lock().unwrap_or_else(|p| p.into_inner());
                    match r {
                        Ok(reply) => {
                            if let (None, Some(x)) = (f.as_ref(), reply.into_inner().failed.first())
                            {
                                *f = Some((x.rank, x.reason.clone()));
                            }
                        }
                        Err(e) => {
                            if f.is_none() {
                                *f = Some((
                                    u32::MAX,
                                    format!("coordinator unreachable: {}", e.message()),
                                ));
                            }
                        }
                    }
                }
                tokio::time::sleep(every).await;
            }
        }));
    }

    pub fn rank(&self) -> u32 {
        self.rank
    }

    /// Fails if the heartbeat has learnt that a member (or the coordinator) failed.
    pub fn check(&self) -> Result<()> {
        match self
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            Some((rank, reason)) => Err(Error::PeerFailed { rank, reason }),
            None => Ok(()),
        }
    }

    /// Waits until every member has reached barrier `name`.
    pub fn barrier(&mut self, name: &str) -> Result<()> {
        self.rt.block_on(self.client.barrier(BarrierRequest {
            token: self.token.clone(),
            rank: self.rank,
            name: name.into(),
        }))?;
        Ok(())
    }

    /// Leaves the job in order (no longer watched for heartbeats).
    pub fn leave(mut self) -> Result<()> {
        self.stop_heartbeat();
        self.rt.block_on(self.client.leave(LeaveRequest {
            token: self.token.clone(),
            rank: self.rank,
        }))?;
        Ok(())
    }

    fn stop_heartbeat(&mut self) {
        if let Some(b) = self.beat.take() {
            b.abort();
        }
    }

    /// Stops heartbeating without leaving (as a crashed process would).
    pub fn abandon(mut self) {
        self.stop_heartbeat();
    }
}

impl Drop for ControlClient {
    fn drop(&mut self) {
        self.stop_heartbeat();
    }
}

/// An error with its causes (a connection error's own message is often just "transport error").
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
