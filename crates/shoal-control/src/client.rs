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
        let mut client = rt
            .block_on(CoordinatorClient::connect(addr.to_string()))
            .map_err(|e| Error::Transport {
                what: format!("connecting to the coordinator at {addr}"),
                why: e.to_string(),
            })?;
        let reply = rt
            .block_on(client.register(RegisterRequest {
                token: token.into(),
                role: role.into(),
                host: host.into(),
                data_addr: data_addr.into(),
            }))?
            .into_inner();
        let reg = Registration {
            rank: reply.rank,
            members: reply.members,
            heartbeat: Duration::from_millis(reply.heartbeat_ms),
        };
        let mut c = Self {
            rt,
            client,
            token: token.into(),
            rank: reg.rank,
            failure: Arc::new(Mutex::new(None)),
            beat: None,
        };
        c.start_heartbeat(reg.heartbeat);
        Ok((c, reg))
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
