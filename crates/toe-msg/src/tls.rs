//! TLS 1.3 on a pipe's connections, with rustls's sans-I/O API: mutual X.509 (each side
//! presents a certificate from the CA the other trusts), and the session's principal
//! checked against the acceptor's certificate (the opener names it as the TLS server name,
//! which rustls verifies against the certificate's subject alternative names).
//!
//! A connection joins its pipe ([`crate::Pipe::add_conn`]) only once its handshake is
//! complete ([`Tls::is_handshaking`]); a handshake that fails is an error naming why, and
//! the connection never joins. The clock rustls checks certificates against is the
//! caller's ([`Tls::client`], [`Tls::server`] take the Unix time), so nothing here reads
//! one. Keys are never printed: [`Identity`]'s `Debug` shows its name only.

use std::io::{Read, Write as _};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use thiserror::Error;

/// Why TLS failed.
#[derive(Debug, Error)]
pub enum TlsError {
    /// rustls refused the peer or the configuration (bad certificate, unknown CA, wrong
    /// name, protocol error).
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
    /// A certificate or key that does not parse.
    #[error("PEM: {0}")]
    Pem(String),
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// The principal is not a valid DNS name for a certificate.
    #[error("{0:?} is not a name a certificate can carry")]
    Name(String),
}

/// An X.509 identity: the name its certificate carries, the certificate chain, the private
/// key, and the CA whose certificates it accepts from peers.
pub struct Identity {
    /// The name (the certificate's subject alternative name, and its common name).
    pub name: String,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    ca: CertificateDer<'static>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("name", &self.name)
            .field("key", &"(not shown)")
            .finish()
    }
}

impl Identity {
    /// An identity from PEM text: the certificate (chain), the PKCS#8 key, and the CA
    /// certificate peers must chain to.
    pub fn from_pem(name: &str, cert: &[u8], key: &[u8], ca: &[u8]) -> Result<Self, TlsError> {
        let pem = |e: rustls::pki_types::pem::Error| TlsError::Pem(e.to_string());
        let chain = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(pem)?;
        if chain.is_empty() {
            return Err(TlsError::Pem("no certificate".into()));
        }
        Ok(Identity {
            name: name.to_string(),
            chain,
            key: PrivateKeyDer::from_pem_slice(key).map_err(pem)?,
            ca: CertificateDer::from_pem_slice(ca).map_err(pem)?,
        })
    }

    /// The same identity, accepting peers of `ca` instead.
    pub fn trusting(self, ca: &TestCa) -> Identity {
        Identity {
            ca: ca.cert.der().clone(),
            ..self
        }
    }
}

/// A certificate authority made with rcgen, for tests and demos.
pub struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    cert: rcgen::Certificate,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TestCa")
    }
}

impl TestCa {
    /// A new self-signed CA named `name`.
    pub fn new(name: &str) -> Result<Self, TlsError> {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new())?;
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, name.to_string());
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let key = rcgen::KeyPair::generate()?;
        let cert = p.self_signed(&key)?;
        Ok(TestCa {
            issuer: rcgen::Issuer::new(p, key),
            cert,
        })
    }

    /// An identity for `name` (a DNS-style name: letters, digits, `-`, `.`), signed by
    /// this CA, trusting this CA.
    pub fn issue(&self, name: &str) -> Result<Identity, TlsError> {
        let (cert, key) = self.make(name)?;
        Ok(Identity {
            name: name.to_string(),
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            ca: self.cert.der().clone(),
        })
    }

    /// [`TestCa::issue`] as PEM files' text: (certificate, PKCS#8 key), for
    /// [`Identity::from_pem`] in another process.
    pub fn issue_pem(&self, name: &str) -> Result<(String, String), TlsError> {
        let (cert, key) = self.make(name)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// A certificate for `name` (its SAN and CN) and its new key, signed by this CA.
    fn make(&self, name: &str) -> Result<(rcgen::Certificate, rcgen::KeyPair), TlsError> {
        ServerName::try_from(name.to_string()).map_err(|_| TlsError::Name(name.to_string()))?;
        let mut p = rcgen::CertificateParams::new(vec![name.to_string()])?;
        p.distinguished_name
            .push(rcgen::DnType::CommonName, name.to_string());
        let key = rcgen::KeyPair::generate()?;
        let cert = p.signed_by(&key, &self.issuer)?;
        Ok((cert, key))
    }

    /// The CA's certificate, PEM.
    pub fn pem(&self) -> String {
        self.cert.pem()
    }
}

/// The caller's clock, for rustls's certificate checks.
#[derive(Debug)]
struct GivenTime(UnixTime);

impl rustls::time_provider::TimeProvider for GivenTime {
    fn current_time(&self) -> Option<UnixTime> {
        Some(self.0)
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(id: &Identity) -> Result<Arc<RootCertStore>, TlsError> {
    let mut r = RootCertStore::empty();
    r.add(id.ca.clone())?;
    Ok(Arc::new(r))
}

/// Plaintext bytes a [`Tls`] holds for sending before [`Tls::send`] takes no more.
pub const SEND_BUFFER: usize = 1 << 20;

/// One connection's TLS, either end.
pub struct Tls {
    conn: rustls::Connection,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("handshaking", &self.conn.is_handshaking())
            .finish()
    }
}

impl Tls {
    /// The opener's end: presents `id`, and accepts only a peer whose certificate chains
    /// to `id`'s CA and carries `principal`. `unix_s` is the time now (seconds since
    /// 1970) for the certificates' validity.
    pub fn client(id: &Identity, principal: &str, unix_s: u64) -> Result<Self, TlsError> {
        let name = ServerName::try_from(principal.to_string())
            .map_err(|_| TlsError::Name(principal.to_string()))?;
        let time = Arc::new(GivenTime(UnixTime::since_unix_epoch(
            std::time::Duration::from_secs(unix_s),
        )));
        let cfg = ClientConfig::builder_with_details(provider(), time)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots(id)?)
            .with_client_auth_cert(id.chain.clone(), id.key.clone_key())?;
        Ok(Tls::new(ClientConnection::new(Arc::new(cfg), name)?.into()))
    }

    /// The acceptor's end: presents `id`, and requires a client certificate chaining to
    /// `id`'s CA.
    pub fn server(id: &Identity, unix_s: u64) -> Result<Self, TlsError> {
        let time = Arc::new(GivenTime(UnixTime::since_unix_epoch(
            std::time::Duration::from_secs(unix_s),
        )));
        let verifier = WebPkiClientVerifier::builder_with_provider(roots(id)?, provider())
            .build()
            .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
        let cfg = ServerConfig::builder_with_details(provider(), time)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(id.chain.clone(), id.key.clone_key())?;
        Ok(Tls::new(ServerConnection::new(Arc::new(cfg))?.into()))
    }

    fn new(mut conn: rustls::Connection) -> Tls {
        conn.set_buffer_limit(Some(SEND_BUFFER));
        Tls { conn }
    }

    /// Whether the handshake is still under way (the connection must not join its pipe
    /// until it is over).
    pub fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// Ciphertext received: the plaintext it carried is appended to `plaintext`. An
    /// error (a bad certificate, a wrong name, garbage) ends the connection; the alert
    /// for the peer is in [`Tls::transmit`].
    pub fn receive(
        &mut self,
        mut ciphertext: &[u8],
        plaintext: &mut Vec<u8>,
    ) -> Result<(), TlsError> {
        while !ciphertext.is_empty() {
            let n = self
                .conn
                .read_tls(&mut ciphertext)
                .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
            let state = self.conn.process_new_packets()?;
            let want = state.plaintext_bytes_to_read();
            if want > 0 {
                let at = plaintext.len();
                plaintext.resize(at + want, 0);
                let got = self.conn.reader().read(&mut plaintext[at..]).unwrap_or(0);
                plaintext.truncate(at + got);
            }
            if n == 0 {
                break;
            }
        }
        Ok(())
    }

    /// Plaintext to send (buffered until the handshake is over, then encrypted by
    /// [`Tls::transmit`]): the bytes taken, all of them while fewer than
    /// [`SEND_BUFFER`] wait; the caller keeps the rest for later.
    pub fn send(&mut self, plaintext: &[u8]) -> usize {
        let mut taken = 0;
        while taken < plaintext.len() {
            match self.conn.writer().write(&plaintext[taken..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => taken += n,
            }
        }
        taken
    }

    /// Append the ciphertext to send to `out`.
    pub fn transmit(&mut self, out: &mut Vec<u8>) {
        while self.conn.wants_write() {
            if self.conn.write_tls(out).is_err() {
                break;
            }
        }
    }
}
