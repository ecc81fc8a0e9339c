//! The gRPC peer of `bench/run transport`: a tonic service that stores a pushed blob and
//! returns it on pull, and a client timing push + pull of a given size over loopback,
//! with message limits raised to fit (defaults stop at 4 MB).

use crate::{Error, Result};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tonic::{Request, Response, Status};

/// Generated messages and stubs of the benchmark service.
pub mod proto {
    tonic::include_proto!("shoal.bench.v1");
}

use proto::transfer_client::TransferClient;
use proto::transfer_server::{Transfer, TransferServer};
use proto::{Ack, Blob};

#[derive(Default)]
struct Store {
    blob: Arc<Mutex<Vec<u8>>>,
}

#[tonic::async_trait]
impl Transfer for Store {
    async fn push(&self, r: Request<Blob>) -> std::result::Result<Response<Ack>, Status> {
        *self.blob.lock().unwrap_or_else(|p| p.into_inner()) = r.into_inner().data;
        Ok(Response::new(Ack {}))
    }

    async fn pull(&self, _: Request<Ack>) -> std::result::Result<Response<Blob>, Status> {
        let data = self.blob.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Ok(Response::new(Blob { data }))
    }
}

fn transport(what: &str) -> impl FnOnce(tonic::transport::Error) -> Error + '_ {
    move |e| Error::Transport {
        what: what.into(),
        why: e.to_string(),
    }
}

/// Seconds per push + pull of `bytes` through a tonic gRPC service on loopback (best
/// of `iters` after one warm-up), client and server in this process.
pub fn grpc_push_pull_seconds(bytes: usize, iters: usize) -> Result<f64> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::Transport {
            what: "starting the benchmark runtime".into(),
            why: e.to_string(),
        })?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| Error::Transport {
                what: "binding the gRPC benchmark server".into(),
                why: e.to_string(),
            })?;
        let addr = listener.local_addr().map_err(|e| Error::Transport {
            what: "reading the server address".into(),
            why: e.to_string(),
        })?;
        let limit = bytes + (1 << 20);
        let svc = TransferServer::new(Store::default())
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit);
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        let mut client = TransferClient::connect(format!("http://{addr}"))
            .await
            .map_err(transport("connecting to the gRPC benchmark server"))?
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit);
        let payload = vec![7u8; bytes];
        let mut best = f64::INFINITY;
        for i in 0..=iters {
            // The request is built before the clock starts (the copy into it is ours).
            let blob = Blob {
                data: payload.clone(),
            };
            let start = Instant::now();
            client.push(blob).await?;
            let back = client.pull(Ack {}).await?.into_inner().data;
            let t = start.elapsed().as_secs_f64();
            if back.len() != bytes {
                return Err(Error::Transport {
                    what: "gRPC pull".into(),
                    why: format!("{} bytes back for {bytes}", back.len()),
                });
            }
            if i > 0 {
                best = best.min(t);
            }
        }
        server.abort();
        Ok(best)
    })
}
