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
