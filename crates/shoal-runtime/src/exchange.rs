//! How a data-parallel worker's gradients meet the other workers' (the strategy a
//! workload's update loop plugs in: none for one process, an allreduce over the
//! workers' data plane, or push and pull against parameter-server shards), and where
//! an update's time goes.

use shoal_comm::ps::PsClient;

/// How a worker's gradients meet the other workers'.
pub enum Exchange {
    /// Allreduce over the workers' data plane; each worker then runs the optimizer.
    Allreduce(shoal_comm::Communicator<Box<dyn shoal_comm::Transport>>),
    /// Push to and pull from the parameter-server shards, which run the optimizer.
    Ps(PsClient),
}

/// A worker's place in a data-parallel job, which every workload's trainer attaches
/// to the same way: its rank, how many workers there are, and how its gradients meet
/// theirs.
pub struct Attachment {
    rank: usize,
    workers: usize,
    exchange: Exchange,
}

impl Attachment {
    /// Worker `rank` of `workers`, exchanging by `exchange` (an allreduce must span
    /// exactly the workers).
    pub fn new(rank: usize, workers: usize, exchange: Exchange) -> crate::Result<Self> {
        if rank >= workers {
            return Err(crate::Error::Cluster(format!(
                "worker rank {rank} in a job of {workers} workers"
            )));
        }
        if let Exchange::Allreduce(c) = &exchange {
            if c.size() != workers || c.rank() != rank {
                return Err(crate::Error::Cluster(format!(
                    "worker {rank} of {workers} attached to an allreduce group where it is rank {} of {}",
                    c.rank(),
                    c.size()
                )));
            }
        }
        Ok(Self {
            rank,
            workers,
            exchange,
        })
    }

    /// This worker's rank among the job's workers.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The job's number of workers.
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// How this worker's gradients meet the others'.
    pub fn exchange(&mut self) -> &mut Exchange {
        &mut self.exchange
    }

    /// The parameter-server client, when the workers meet through shards.
    pub fn shards(&mut self) -> Option<&mut PsClient> {
        match &mut self.exchange {
            Exchange::Ps(c) => Some(c),
            Exchange::Allreduce(_) => None,
        }
    }

    /// Leaves the job: tells the shards this worker is done (the shards end when every
    /// worker has); an allreduce group has nothing to be told.
    pub fn close(self) -> shoal_comm::Result<()> {
        match self.exchange {
            Exchange::Ps(c) => c.close(),
            Exchange::Allreduce(_) => Ok(()),
        }
    }
}

/// Where the time of the updates went, in seconds summed over steps.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct PhaseTimes {
    /// Engine forward pass (up to the loss value).
    pub forward: f64,
    /// Engine backward pass.
    pub backward: f64,
    /// Gradients out to the flat buffer, and clipping.
    pub grads_out: f64,
    /// Optimizer update on the flat buffers.
    pub optimizer: f64,
    /// Parameters written back into the engine.
    pub params_in: f64,
    /// Gradient exchange with the other workers (allreduce, or push and pull).
    pub comm: f64,
}
