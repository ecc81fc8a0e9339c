//! TLS on the TCP data plane and the parameter-server links (rustls over ring, feature
//! `tls`): every connection is mutually authenticated against one job CA, and every
//! process presents a certificate for the name [`SERVER_NAME`]. [`Pem::generate`] makes
//! a per-job CA and the job's certificate; [`Pem::read_dir`] loads one from files.
//! Without the feature, asking for TLS is an error that says so.

use crate::{Error, Result};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// The name every job certificate carries and every client checks.
pub const SERVER_NAME: &str = "shoal";

/// The files a TLS directory holds: the CA that signs the job's certificates, this
/// process's certificate chain and its private key.
pub const FILES: [&str; 3] = ["ca.pem", "cert.pem", "key.pem"];

/// Largest PEM file read from a TLS directory.
const MAX_PEM_BYTES: u64 = 1 << 20;

/// A job's TLS material in PEM: the CA certificate, this process's certificate chain
/// and its private key.
#[derive(Clone)]
pub struct Pem {
    pub ca: String,
    pub cert: String,
    pub key: String,
}

impl std::fmt::Debug for Pem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pem").finish_non_exhaustive()
    }
}

#[cfg(feature = "tls")]
fn tls_err(what: impl Into<String>) -> impl FnOnce(String) -> Error {
    let what = what.into();
    move |why| Error::Tls { what, why }
}

impl Pem {
    /// Reads `ca.pem`, `cert.pem` and `key.pem` from `dir`.
    pub fn read_dir(dir: &Path) -> Result<Pem> {
        let read = |name: &str| -> Result<String> {
            let p = dir.join(name);
            let f = std::fs::File::open(&p).map_err(|source| Error::Io {
                what: format!("opening the TLS file {}", p.display()),
                source,
            })?;
            let mut s = String::new();
            f.take(MAX_PEM_BYTES + 1)
                .read_to_string(&mut s)
                .map_err(|source| Error::Io {
                    what: format!("reading the TLS file {}", p.display()),
                    source,
                })?;
            if s.len() as u64 > MAX_PEM_BYTES {
                return Err(Error::Tls {
                    what: p.display().to_string(),
                    why: format!("larger than {MAX_PEM_BYTES} bytes"),
                });
            }
            Ok(s)
        };
        Ok(Pem {
            ca: read(FILES[0])?,
            cert: read(FILES[1])?,
            key: read(FILES[2])?,
        })
    }

    /// Writes the three files into a new directory `dir` that only its owner may enter
    /// (an existing one is an error: nothing of someone else's is followed or reused).
    pub fn write_dir(&self, dir: &Path) -> Result<()> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .map_err(|source| Error::Io {
                what: format!("creating the TLS directory {}", dir.display()),
                source,
            })?;
        for (name, text) in FILES.iter().zip([&self.ca, &self.cert, &self.key]) {
            let p = dir.join(name);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&p)
                .and_then(|mut f| f.write_all(text.as_bytes()).map(|_| f))
                .map_err(|source| Error::Io {
                    what: format!("writing the TLS file {}", p.display()),
                    source,
                })?;
            f.flush().map_err(|source| Error::Io {
                what: format!("writing the TLS file {}", p.display()),
                source,
            })?;
        }
        Ok(())
    }

    /// A fresh per-job CA (its key is dropped once it has signed) and one certificate
    /// for [`SERVER_NAME`] signed by it, for servers and clients alike: ECDSA P-256.
    #[cfg(feature = "tls")]
    pub fn generate() -> Result<Pem> {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose,
        };
        let e = |what: &'static str| move |x: rcgen::Error| tls_err(what)(x.to_string());
        let ca_key = KeyPair::generate().map_err(e("generating the job CA's key"))?;
        let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(e("the job CA"))?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.distinguished_name
            .push(DnType::CommonName, "shoal job CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key).map_err(e("signing the job CA"))?;
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().map_err(e("generating the job's key"))?;
        let mut p = CertificateParams::new(vec![SERVER_NAME.to_string()])
            .map_err(e("the job certificate"))?;
        p.distinguished_name.push(DnType::CommonName, SERVER_NAME);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = p
            .signed_by(&key, &issuer)
            .map_err(e("signing the job certificate"))?;
        Ok(Pem {
            ca: ca_cert.pem(),
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }

    /// Without the `tls` feature: an error saying so.
    #[cfg(not(feature = "tls"))]
    pub fn generate() -> Result<Pem> {
        Err(no_tls())
    }
}

#[cfg(not(feature = "tls"))]
fn no_tls() -> Error {
    Error::Tls {
        what: "TLS".into(),
        why: "this build of shoal has no TLS (build it with the cargo feature `tls`)".into(),
    }
}

/// The client and server settings made from one [`Pem`]: both sides demand a
/// certificate signed by the job CA.
pub struct Tls {
    #[cfg(feature = "tls")]
    client: Arc<rustls::ClientConfig>,
    #[cfg(feature = "tls")]
    server: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls")
    }
}

/// ring's provider with TLS 1.3's AES-128-GCM first (the default puts AES-256 first;
/// 128-bit keys are as strong as the job needs and a third faster on the data plane).
#[cfg(feature = "tls")]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    let first = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256;
    p.cipher_suites.retain(|s| s.suite() != first.suite());
    p.cipher_suites.insert(0, first);
    Arc::new(p)
}

impl Tls {
    /// Parses `pem` into client and server settings; any unreadable part is an error
    /// naming it.
    #[cfg(feature = "tls")]
    pub fn new(pem: &Pem) -> Result<Arc<Tls>> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = |text: &str, what: &str| -> Result<Vec<CertificateDer<'static>>> {
            let v = CertificateDer::pem_slice_iter(text.as_bytes())
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| tls_err(what)(e.to_string()))?;
            if v.is_empty() {
                return Err(tls_err(what)("no certificate in it".into()));
            }
            Ok(v)
        };
        let ca = certs(&pem.ca, "the CA certificate (ca.pem)")?;
        let chain = certs(&pem.cert, "the certificate (cert.pem)")?;
        let key = PrivateKeyDer::from_pem_slice(pem.key.as_bytes())
            .map_err(|e| tls_err("the private key (key.pem)")(e.to_string()))?;
        let mut roots = rustls::RootCertStore::empty();
        for c in ca {
            roots
                .add(c)
                .map_err(|e| tls_err("the CA certificate (ca.pem)")(e.to_string()))?;
        }
        let roots = Arc::new(roots);
        let bad = |what: &'static str| move |e: rustls::Error| tls_err(what)(e.to_string());
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .map_err(|e| tls_err("the client verifier")(e.to_string()))?;
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(bad("the server settings"))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(bad("the certificate and key (cert.pem, key.pem)"))?;
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(bad("the client settings"))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(bad("the certificate and key (cert.pem, key.pem)"))?;
        Ok(Arc::new(Tls {
            client: Arc::new(client),
            server: Arc::new(server),
        }))
    }

    /// Without the `tls` feature: an error saying so.
    #[cfg(not(feature = "tls"))]
    pub fn new(_pem: &Pem) -> Result<Arc<Tls>> {
        Err(no_tls())
    }

    /// Runs the client side of the handshake on `tcp` within `timeout`.
    pub fn connect(&self, tcp: TcpStream, timeout: Duration) -> Result<Socket> {
        #[cfg(feature = "tls")]
        {
            let name = rustls::pki_types::ServerName::try_from(SERVER_NAME)
                .expect("a valid DNS name")
                .to_owned();
            let conn = rustls::ClientConnection::new(self.client.clone(), name)
                .map_err(|e| tls_err("starting a TLS client")(e.to_string()))?;
            handshake(rustls::Connection::Client(conn), tcp, timeout)
        }
        #[cfg(not(feature = "tls"))]
        {
            let _ = (tcp, timeout);
            Err(no_tls())
        }
    }

    /// Runs the server side of the handshake on `tcp` within `timeout`.
    pub fn accept(&self, tcp: TcpStream, timeout: Duration) -> Result<Socket> {
        #[cfg(feature = "tls")]
        {
            let conn = rustls::ServerConnection::new(self.server.clone())
                .map_err(|e| tls_err("starting a TLS server")(e.to_string()))?;
            handshake(rustls::Connection::Server(conn), tcp, timeout)
        }
        #[cfg(not(feature = "tls"))]
        {
            let _ = (tcp, timeout);
            Err(no_tls())
        }
    }
}

#[cfg(feature = "tls")]
fn handshake(
    mut conn: rustls::Connection,
    mut tcp: TcpStream,
    timeout: Duration,
) -> Result<Socket> {
    let peer = tcp
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    let what = format!("the TLS handshake with {peer}");
    let before = tcp.read_timeout().ok().flatten();
    let deadline = std::time::Instant::now() + timeout;
    while conn.is_handshaking() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(tls_err(what)(format!("not finished within {timeout:?}")));
        }
        tcp.set_read_timeout(Some(left))
            .and_then(|_| tcp.set_write_timeout(Some(left)))
            .map_err(|source| Error::Io {
                what: what.clone(),
                source,
            })?;
        conn.complete_io(&mut tcp)
            .map_err(|e| tls_err(what.clone())(e.to_string()))?;
    }
    tcp.set_read_timeout(before)
        .and_then(|_| tcp.set_write_timeout(None))
        .map_err(|source| Error::Io { what, source })?;
    Ok(Socket::Tls(Box::new(conn), tcp))
}

/// A connection of the TCP data plane: plain, or TLS over it.
pub enum Socket {
    Plain(TcpStream),
    #[cfg(feature = "tls")]
    Tls(Box<rustls::Connection>, TcpStream),
}

impl Socket {
    /// The TCP connection underneath (for its timeouts and options).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Socket::Plain(s) => s,
            #[cfg(feature = "tls")]
            Socket::Tls(_, s) => s,
        }
    }
}

#[cfg(feature = "tls")]
fn invalid(e: rustls::Error) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e)
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Socket::Plain(s) => s.read(buf),
            #[cfg(feature = "tls")]
            Socket::Tls(conn, tcp) => loop {
                match conn.reader().read(buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if conn.read_tls(tcp)? == 0 {
                            // The peer closed without its close-notify: a cut connection.
                            return Err(std::io::ErrorKind::UnexpectedEof.into());
                        }
                        conn.process_new_packets().map_err(|e| {
                            // Tell the peer why before giving up (best effort).
                            let _ = conn.write_tls(tcp);
                            invalid(e)
                        })?;
                        while conn.wants_write() {
                            conn.write_tls(tcp)?;
                        }
                    }
                    r => return r,
                }
            },
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_vectored(&[std::io::IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        match self {
            Socket::Plain(s) => s.write_vectored(bufs),
            #[cfg(feature = "tls")]
            Socket::Tls(conn, tcp) => {
                // Encrypt what the connection takes (up to its buffer limit), then put
                // every record on the wire before returning, so that a message is never
                // left in a buffer while this side waits on another peer.
                let n = conn.writer().write_vectored(bufs)?;
                while conn.wants_write() {
                    conn.write_tls(tcp)?;
                }
                Ok(n)
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Socket::Plain(s) => s.flush(),
            #[cfg(feature = "tls")]
            Socket::Tls(conn, tcp) => {
                while conn.wants_write() {
                    conn.write_tls(tcp)?;
                }
                tcp.flush()
            }
        }
    }
}
