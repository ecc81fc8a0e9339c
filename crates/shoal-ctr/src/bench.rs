//! The CTR side of `bench/run ctr-scale`: how large a sparse table gets per row and how
//! fast rows are created and pushed and pulled through parameter-server shards.

use crate::Result;
use serde::Serialize;
use std::time::Instant;

/// What `shoal bench ctr-scale` measured.
#[derive(Debug, Clone, Serialize)]
pub struct CtrScaleResult {
    pub rows: usize,
    pub row_values: usize,
    /// Bytes the table holds per row (values, optimizer state, keys, index) and the raw
    /// bytes of a row's values.
    pub bytes_per_row: f64,
    pub raw_row_bytes: usize,
    pub peak_rss_mb: f64,
    /// Rows created (first touch) per second, one thread.
    pub insert_rows_per_s: f64,
    /// Sparse push + pull rows per second of 2 workers through 1 and 2 shards.
    pub ps_rows_per_s: [f64; 2],
}

/// Creates `rows` rows of `dim` values (with `rule`'s state) with keys spread over the whole
/// 64-bit space, then times sparse push + pull of `ps_keys`-key batches by 2 workers
/// through 1 and 2 parameter-server shards.
pub fn ctr_scale(
    rows: usize,
    dim: usize,
    rule: shoal_optim::SparseRule,
    ps_keys: usize,
    ps_steps: usize,
) -> Result<CtrScaleResult> {
    use shoal_comm::ps::{PsClient, PsMode, PsServer, ShardConfig};
    use shoal_optim::SparseTable;
    let mut t = SparseTable::new(dim, rule, 0.01, 1)?;
    let batch = 4096;
    let mut keys = vec![0u64; batch];
    let mut out = vec![0.0f32; batch * dim];
    let start = Instant::now();
    let mut made = 0usize;
    while made < rows {
        let n = batch.min(rows - made);
        for (i, k) in keys[..n].iter_mut().enumerate() {
            *k = shoal_data::ctr::mix64((made + i) as u64 ^ 0x5EED);
        }
        t.pull(&keys[..n], &mut out[..n * dim])?;
        made += n;
    }
    let insert_rows_per_s = rows as f64 / start.elapsed().as_secs_f64();
    let bytes_per_row = t.bytes() as f64 / t.len().max(1) as f64;
    let peak = shoal_runtime::sys::peak_rss_mb();
    drop(t);
    let mut ps = [0.0f64; 2];
    for (i, shards) in [1usize, 2].into_iter().enumerate() {
        let cfg = ShardConfig {
            workers: 2,
            mode: PsMode::Sync,
            sparse_dim: dim,
            sparse_rule: Some(rule),
            token: "scale".into(),
            ..Default::default()
        };
        let servers = (0..shards)
            .map(|_| {
                let l = std::net::TcpListener::bind("127.0.0.1:0")
                    .map_err(crate::error::io_err("127.0.0.1"))?;
                Ok(PsServer::start(l, 0, cfg.clone())?)
            })
            .collect::<Result<Vec<_>>>()?;
        let addrs: Vec<_> = servers.iter().filter_map(|s| s.addr()).collect();
        let hs: Vec<_> =
            (0..2)
                .map(|w| {
                    let addrs = addrs.clone();
                    std::thread::spawn(move || -> Result<f64> {
                        let mut c = PsClient::connect(&addrs, w, 0, dim, "scale")?;
                        if w == 0 {
                            c.init(&[])?;
                        }
                        let mut rows = vec![0.0f32; ps_keys * dim];
                        let grads = vec![0.01f32; ps_keys * dim];
                        let mut keys: Vec<u64> = Vec::with_capacity(ps_keys);
                        let start = Instant::now();
                        for s in 0..ps_steps {
                            keys.clear();
                            keys.extend((0..ps_keys).map(|i| {
                                shoal_data::ctr::mix64(((s * ps_keys + i) * 2 + w) as u64)
                            }));
                            c.pull_sparse(&keys, &mut rows)?;
                            c.push(s as u64, &[], Some((&keys, &grads)))?;
                            c.pull(s as u64 + 1, &mut [])?;
                        }
                        let secs = start.elapsed().as_secs_f64();
                        c.close()?;
                        Ok((ps_keys * ps_steps) as f64 / secs)
                    })
                })
                .collect();
        let mut total = 0.0;
        for h in hs {
            total += h
                .join()
                .map_err(|_| crate::Error::Cluster("a benchmark worker panicked".into()))??;
        }
        for s in servers {
            s.join()?;
        }
        ps[i] = total;
    }
    Ok(CtrScaleResult {
        rows,
        row_values: dim,
        bytes_per_row,
        raw_row_bytes: dim * 4,
        peak_rss_mb: peak,
        insert_rows_per_s,
        ps_rows_per_s: ps,
    })
}
