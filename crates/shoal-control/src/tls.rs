//! TLS on the control plane (feature `tls`): the coordinator and every client present a
//! certificate signed by the job CA and demand one from the other side; the name checked
//! is [`SERVER_NAME`]. Without the feature, asking for TLS is an error that says so.

use crate::{Error, Result};

/// The name every job certificate carries and every client checks.
pub const SERVER_NAME: &str = "shoal";

/// How long a new connection has for its TLS handshake.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// PEM text of the job CA, this process's certificate chain and its private key.
#[derive(Clone)]
pub struct TlsPem {
    pub ca: String,
    pub cert: String,
    pub key: String,
}

impl std::fmt::Debug for TlsPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsPem").finish_non_exhaustive()
    }
}

#[cfg(not(feature = "tls"))]
fn no_tls() -> Error {
    Error::Status("this build of shoal has no TLS (build it with the cargo feature `tls`)".into())
}

/// The coordinator's side.
#[cfg(feature = "tls")]
pub(crate) fn server(b: tonic::transport::Server, t: &TlsPem) -> Result<tonic::transport::Server> {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let cfg = ServerTlsConfig::new()
        .identity(Identity::from_pem(&t.cert, &t.key))
        .client_ca_root(Certificate::from_pem(&t.ca))
        .timeout(HANDSHAKE_TIMEOUT);
    b.tls_config(cfg).map_err(|e| Error::Transport {
        what: "setting up the coordinator's TLS".into(),
        why: crate::client::error_chain(&e),
    })
}

#[cfg(not(feature = "tls"))]
pub(crate) fn server(
    _b: tonic::transport::Server,
    _t: &TlsPem,
) -> Result<tonic::transport::Server> {
    Err(no_tls())
}

/// A client's channel to `addr` (`http://HOST:PORT` or `HOST:PORT`) over TLS.
#[cfg(feature = "tls")]
pub(crate) fn endpoint(addr: &str, t: &TlsPem) -> Result<tonic::transport::Endpoint> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let host = addr
        .strip_prefix("http://")
        .or_else(|| addr.strip_prefix("https://"))
        .unwrap_or(addr);
    let bad = |e: tonic::transport::Error| Error::Transport {
        what: format!("the coordinator address {addr}"),
        why: crate::client::error_chain(&e),
    };
    let cfg = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&t.ca))
        .identity(Identity::from_pem(&t.cert, &t.key))
        .domain_name(SERVER_NAME)
        .timeout(HANDSHAKE_TIMEOUT);
    Endpoint::from_shared(format!("https://{host}"))
        .map_err(bad)?
        .tls_config(cfg)
        .map_err(bad)
}

#[cfg(not(feature = "tls"))]
pub(crate) fn endpoint(_addr: &str, _t: &TlsPem) -> Result<tonic::transport::Endpoint> {
    Err(no_tls())
}
