//! The security upgrade of a connection: TLS 1.3 or Noise, negotiated by multistream-select.
//!
//! Both are libp2p's own handshakes (`/tls/1.0.0`, `/noise`), so any libp2p peer that speaks
//! one of them connects. TLS is built here on rustls rather than taken from `libp2p-tls`'s
//! `Config` for one reason: the cipher order. `libp2p-tls` puts ChaCha20-Poly1305 first, and
//! rustls then uses it; we offer AES-128-GCM first (AES-NI, VAES and PCLMUL in aws-lc, the
//! crypto provider libp2p-tls itself uses), which costs a fraction of the CPU per byte (see
//! docs/benchmarks.md, `bench blob`). The certificate (self-signed, carrying the libp2p key
//! and its signature) is made and checked by `libp2p-tls`'s `certificate` module, so the
//! identity rules are the ones every libp2p TLS peer follows; only the wiring into rustls is
//! ours. A node offers the protocols of its [`Security`] in order, and the dialer's first
//! that the listener also speaks wins: two nodes of this build agree on TLS, and a Noise-only
//! peer still gets Noise.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use super::coalesce::Coalesce;
use futures::future::BoxFuture;
use futures::{AsyncRead, AsyncWrite, FutureExt};
use libp2p::core::upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade, UpgradeInfo};
use libp2p::identity::Keypair;
use libp2p::{PeerId, noise};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::aws_lc_rs::{self as provider, cipher_suite};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

/// Which security protocols a node offers on its connections, in order of preference.
///
/// Every member of a consortium runs the same binary, so the default offers TLS first and
/// Noise second: nodes of this build use TLS, and a node restricted to Noise (or an older
/// build, which knew only Noise) is still understood.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Security {
    /// TLS 1.3 (AES-128-GCM first), then Noise: the default.
    #[default]
    TlsOrNoise,
    /// TLS 1.3 only.
    Tls,
    /// Noise only (`Noise_XX_25519_ChaChaPoly_SHA256`), what earlier builds spoke.
    Noise,
}

impl Security {
    /// The protocols offered, most preferred first.
    fn protocols(self) -> &'static [Proto] {
        match self {
            Security::TlsOrNoise => &[Proto::Tls, Proto::Noise],
            Security::Tls => &[Proto::Tls],
            Security::Noise => &[Proto::Noise],
        }
    }

    /// The name used on command lines and in benchmark reports.
    pub fn name(self) -> &'static str {
        match self {
            Security::TlsOrNoise => "tls-or-noise",
            Security::Tls => "tls",
            Security::Noise => "noise",
        }
    }
}

impl std::str::FromStr for Security {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tls-or-noise" => Ok(Security::TlsOrNoise),
            "tls" => Ok(Security::Tls),
            "noise" => Ok(Security::Noise),
            other => Err(format!("unknown security {other:?} (tls-or-noise, tls, noise)")),
        }
    }
}

impl std::fmt::Display for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One security protocol, as named in multistream-select.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// `/tls/1.0.0`.
    Tls,
    /// `/noise`.
    Noise,
}

impl AsRef<str> for Proto {
    fn as_ref(&self) -> &str {
        match self {
            Proto::Tls => "/tls/1.0.0",
            Proto::Noise => "/noise",
        }
    }
}

/// Why a security handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum SecureError {
    /// The TLS handshake failed (including a certificate that does not carry a valid libp2p
    /// identity).
    #[error("TLS handshake: {0}")]
    Tls(io::Error),
    /// The peer's certificate could not be read after the handshake.
    #[error("TLS certificate: {0}")]
    Certificate(String),
    /// The Noise handshake failed.
    #[error("Noise handshake: {0}")]
    Noise(#[from] noise::Error),
}

/// The connection upgrade that authenticates and encrypts (see the module doc).
#[derive(Clone)]
pub struct Secure {
    security: Security,
    noise: noise::Config,
    tls_server: Arc<rustls::ServerConfig>,
    tls_client: Arc<rustls::ClientConfig>,
}

impl Secure {
    /// The upgrade for a node with `keypair`, offering `security`'s protocols.
    pub fn new(keypair: &Keypair, security: Security) -> Result<Self, SecureError> {
        let noise = noise::Config::new(keypair)?;
        let (tls_server, tls_client) = tls_configs(keypair)?;
        Ok(Self {
            security,
            noise,
            tls_server: Arc::new(tls_server),
            tls_client: Arc::new(tls_client),
        })
    }
}

/// TLS 1.3 cipher suites, cheapest first on x86_64 and aarch64 with AES instructions.
/// Both ends list them in this order and the server follows its own, so AES-128-GCM is
/// chosen whenever both offer it.
static CIPHER_SUITES: &[rustls::SupportedCipherSuite] = &[
    cipher_suite::TLS13_AES_128_GCM_SHA256,
    cipher_suite::TLS13_AES_256_GCM_SHA384,
    cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
];

/// ALPN of libp2p's TLS handshake.
const P2P_ALPN: &[u8] = b"libp2p";

/// The signature schemes a libp2p certificate's handshake may use (libp2p-tls's list).
const SCHEMES: &[SignatureScheme] = &[
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ED25519,
    SignatureScheme::RSA_PSS_SHA512,
    SignatureScheme::RSA_PSS_SHA384,
    SignatureScheme::RSA_PSS_SHA256,
    SignatureScheme::RSA_PKCS1_SHA512,
    SignatureScheme::RSA_PKCS1_SHA384,
    SignatureScheme::RSA_PKCS1_SHA256,
];

fn tls_configs(keypair: &Keypair) -> Result<(rustls::ServerConfig, rustls::ClientConfig), SecureError> {
    let bad = |e: &dyn std::fmt::Display| SecureError::Certificate(e.to_string());
    let (cert, key) = libp2p::tls::certificate::generate(keypair).map_err(|e| bad(&e))?;
    let provider = Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: CIPHER_SUITES.to_vec(),
        ..provider::default_provider()
    });
    // The certificate carries a critical extension (the libp2p key) that webpki does not
    // know, so rustls's `with_single_cert` would refuse it: it is handed out as it is.
    let signing_key = provider.key_provider.load_private_key(key).map_err(|e| bad(&e))?;
    let certified = Arc::new(OwnCert(Arc::new(rustls::sign::CertifiedKey::new(
        vec![cert],
        signing_key,
    ))));
    let verifier = Arc::new(Libp2pCertVerifier);
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| bad(&e))?
        .with_client_cert_verifier(verifier.clone())
        .with_cert_resolver(certified.clone());
    server.alpn_protocols = vec![P2P_ALPN.to_vec()];
    server.ignore_client_order = true;
    // No session tickets: every connection does the full handshake with its certificate.
    server.send_tls13_tickets = 0;
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| bad(&e))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(certified);
    client.alpn_protocols = vec![P2P_ALPN.to_vec()];
    client.resumption = rustls::client::Resumption::disabled();
    Ok((server, client))
}

/// This node's certificate, offered in every handshake, whatever the peer asks for.
#[derive(Debug)]
struct OwnCert(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for OwnCert {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl rustls::client::ResolvesClientCert for OwnCert {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Checks a peer's certificate as libp2p's TLS handshake requires: exactly one,
/// self-signed, with a libp2p extension whose signature by the peer's identity key holds
/// (`libp2p::tls::certificate::parse` does those checks), and the handshake signed by the
/// certificate's key. Which peer it is (the [`PeerId`] of that identity key) is read after
/// the handshake and checked by the swarm against the peer dialled, and by the member gate.
#[derive(Debug)]
struct Libp2pCertVerifier;

fn one_certificate(end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>]) -> Result<(), rustls::Error> {
    if !intermediates.is_empty() {
        return Err(rustls::Error::General(
            "libp2p TLS requires exactly one certificate".into(),
        ));
    }
    libp2p::tls::certificate::parse(end_entity)
        .map(|_| ())
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))
}

fn handshake_signature(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    libp2p::tls::certificate::parse(cert)
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?
        .verify_signature(dss.scheme, message, dss.signature())
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadSignature))?;
    Ok(HandshakeSignatureValid::assertion())
}

impl ServerCertVerifier for Libp2pCertVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        one_certificate(end_entity, intermediates)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is configured, so rustls never asks; refuse rather than trust.
        Err(rustls::Error::General("only TLS 1.3 is offered".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        handshake_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        SCHEMES.to_vec()
    }
}

impl ClientCertVerifier for Libp2pCertVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        one_certificate(end_entity, intermediates)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("only TLS 1.3 is offered".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        handshake_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        SCHEMES.to_vec()
    }
}

/// The peer behind a finished TLS handshake, from its certificate.
fn tls_peer(state: &rustls::CommonState) -> Result<PeerId, SecureError> {
    let certs = state
        .peer_certificates()
        .ok_or_else(|| SecureError::Certificate("the peer sent no certificate".into()))?;
    let [cert] = certs else {
        return Err(SecureError::Certificate(format!(
            "{} certificates, not one",
            certs.len()
        )));
    };
    libp2p::tls::certificate::parse(cert)
        .map(|c| c.peer_id())
        .map_err(|e| SecureError::Certificate(e.to_string()))
}

/// Server name of every outbound TLS handshake: libp2p's spec forbids SNI, and an
/// unspecified IP address makes rustls send none.
fn no_server_name() -> ServerName<'static> {
    ServerName::IpAddress(rustls::pki_types::IpAddr::from(std::net::IpAddr::V4(
        std::net::Ipv4Addr::UNSPECIFIED,
    )))
}

/// Bytes of TLS records rustls may hold before the socket takes them: a whole yamux frame
/// (see [`super::muxer`]), so that one frame is encrypted in whole records and written at once.
const TLS_SEND_BUFFER: usize = 512 << 10;

/// Logs which cipher suite a finished TLS handshake agreed on.
fn tls_agreed(peer: &PeerId, state: &rustls::CommonState) {
    tracing::debug!(%peer, suite = ?state.negotiated_cipher_suite().map(|s| s.suite()), "TLS connection");
}

/// An authenticated, encrypted connection, whichever protocol was agreed.
pub enum Secured<C> {
    /// TLS 1.3, its small writes gathered into whole records ([`Coalesce`]).
    Tls(Box<Coalesce<futures_rustls::TlsStream<C>>>),
    /// Noise.
    Noise(Box<noise::Output<C>>),
}

impl<C> Secured<C> {
    /// The protocol this connection runs.
    pub fn proto(&self) -> Proto {
        match self {
            Secured::Tls(_) => Proto::Tls,
            Secured::Noise(_) => Proto::Noise,
        }
    }
}

impl UpgradeInfo for Secure {
    type Info = Proto;
    type InfoIter = std::iter::Copied<std::slice::Iter<'static, Proto>>;

    fn protocol_info(&self) -> Self::InfoIter {
        self.security.protocols().iter().copied()
    }
}

impl<C> InboundConnectionUpgrade<C> for Secure
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = (PeerId, Secured<C>);
    type Error = SecureError;
    type Future = BoxFuture<'static, Result<Self::Output, SecureError>>;

    fn upgrade_inbound(self, io: C, proto: Proto) -> Self::Future {
        match proto {
            Proto::Noise => self
                .noise
                .upgrade_inbound(io, "/noise")
                .map(|r| {
                    r.map(|(p, s)| (p, Secured::Noise(Box::new(s))))
                        .map_err(SecureError::from)
                })
                .boxed(),
            Proto::Tls => async move {
                let mut stream = futures_rustls::TlsAcceptor::from(self.tls_server)
                    .accept(io)
                    .await
                    .map_err(SecureError::Tls)?;
                let peer = tls_peer(stream.get_ref().1)?;
                let conn = stream.get_mut().1;
                conn.set_buffer_limit(Some(TLS_SEND_BUFFER));
                tls_agreed(&peer, conn);
                Ok((peer, Secured::Tls(Box::new(Coalesce::new(stream.into())))))
            }
            .boxed(),
        }
    }
}

impl<C> OutboundConnectionUpgrade<C> for Secure
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = (PeerId, Secured<C>);
    type Error = SecureError;
    type Future = BoxFuture<'static, Result<Self::Output, SecureError>>;

    fn upgrade_outbound(self, io: C, proto: Proto) -> Self::Future {
        match proto {
            Proto::Noise => self
                .noise
                .upgrade_outbound(io, "/noise")
                .map(|r| {
                    r.map(|(p, s)| (p, Secured::Noise(Box::new(s))))
                        .map_err(SecureError::from)
                })
                .boxed(),
            Proto::Tls => async move {
                let mut stream = futures_rustls::TlsConnector::from(self.tls_client)
                    .connect(no_server_name(), io)
                    .await
                    .map_err(SecureError::Tls)?;
                let peer = tls_peer(stream.get_ref().1)?;
                let conn = stream.get_mut().1;
                conn.set_buffer_limit(Some(TLS_SEND_BUFFER));
                tls_agreed(&peer, conn);
                Ok((peer, Secured::Tls(Box::new(Coalesce::new(stream.into())))))
            }
            .boxed(),
        }
    }
}

impl<C: AsyncRead + AsyncWrite + Unpin> AsyncRead for Secured<C> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Secured::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Secured::Noise(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<C: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Secured<C> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Secured::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Secured::Noise(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Secured::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Secured::Noise(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Secured::Tls(s) => Pin::new(s.as_mut()).poll_close(cx),
            Secured::Noise(s) => Pin::new(s.as_mut()).poll_close(cx),
        }
    }
}
