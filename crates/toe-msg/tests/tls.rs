//! TLS 1.3 between pipe ends, bytes carried by the test: mutual certificates, the
//! principal checked, refusals before anything joins the pipe, and a pipe whose
//! connections run over TLS.

use toe_msg::{Event, Identity, Pipe, PipeConfig, PipeEvent, TestCa, Tls, TlsError};

const NOW: u64 = 1_800_000_000; // 2027, within rcgen's default validity

/// Run the handshake: `Err((true, e))` if the client failed, `(false, e)` the server.
fn handshake(c: &mut Tls, s: &mut Tls) -> Result<(), (bool, TlsError)> {
    let mut junk = Vec::new();
    for _ in 0..20 {
        let mut b = Vec::new();
        c.transmit(&mut b);
        s.receive(&b, &mut junk).map_err(|e| (false, e))?;
        let mut b = Vec::new();
        s.transmit(&mut b);
        c.receive(&b, &mut junk).map_err(|e| (true, e))?;
        if !c.is_handshaking() && !s.is_handshaking() {
            assert!(junk.is_empty());
            return Ok(());
        }
    }
    panic!("the handshake did not end");
}

fn pair(ca: &TestCa, client: &str, server: &str) -> (Identity, Identity) {
    (ca.issue(client).unwrap(), ca.issue(server).unwrap())
}

#[test]
fn mutual_tls_carries_bytes_both_ways() {
    let ca = TestCa::new("toemu test CA").unwrap();
    let (ci, si) = pair(&ca, "backup-client", "store-1");
    let mut c = Tls::client(&ci, "store-1", NOW).unwrap();
    let mut s = Tls::server(&si, NOW).unwrap();
    handshake(&mut c, &mut s).unwrap();
    assert_eq!(c.send(b"hello store"), 11);
    let (mut wire, mut got) = (Vec::new(), Vec::new());
    c.transmit(&mut wire);
    assert!(!wire.windows(11).any(|w| w == b"hello store"), "encrypted");
    s.receive(&wire, &mut got).unwrap();
    assert_eq!(got, b"hello store");
    // Keys never show in debug output.
    let shown = format!("{ci:?} {c:?}");
    assert!(shown.contains("backup-client") && !shown.contains("PRIVATE") && shown.len() < 200);
    assert!(ca.pem().starts_with("-----BEGIN CERTIFICATE-----"));
}

#[test]
fn a_wrong_principal_an_unknown_ca_or_no_certificate_is_refused() {
    let ca = TestCa::new("toemu test CA").unwrap();
    let (ci, si) = pair(&ca, "backup-client", "store-1");
    // The opener wants store-2; the acceptor's certificate says store-1.
    let mut c = Tls::client(&ci, "store-2", NOW).unwrap();
    let mut s = Tls::server(&si, NOW).unwrap();
    let (client_side, e) = handshake(&mut c, &mut s).unwrap_err();
    assert!(client_side, "{e}");
    assert!(e.to_string().contains("not valid for name"), "{e}");
    // A client certificate from another CA (the client trusts store-1's CA): the server
    // refuses it.
    let other = TestCa::new("someone else").unwrap();
    let stranger = other.issue("backup-client").unwrap().trusting(&ca);
    let mut c = Tls::client(&stranger, "store-1", NOW).unwrap();
    let mut s = Tls::server(&si, NOW).unwrap();
    let (client_side, e) = handshake(&mut c, &mut s).unwrap_err();
    assert!(!client_side, "{e}");
    assert!(e.to_string().contains("UnknownIssuer"), "{e}");
    // No client certificate at all: a plain rustls client without client auth.
    let mut s = Tls::server(&si, NOW).unwrap();
    let e = no_cert_client(&ca, &mut s);
    assert!(
        e.to_string().contains("Certificate") || e.to_string().contains("certificate"),
        "{e}"
    );
}

/// A rustls client trusting `ca` but sending no certificate; the server's error.
fn no_cert_client(ca: &TestCa, s: &mut Tls) -> TlsError {
    use std::sync::Arc;
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(ca.pem().as_bytes()).unwrap();
    roots.add(der).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut c =
        rustls::ClientConnection::new(Arc::new(cfg), "store-1".try_into().unwrap()).unwrap();
    let mut junk = Vec::new();
    for _ in 0..20 {
        let mut b = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut b).unwrap();
        }
        if let Err(e) = s.receive(&b, &mut junk) {
            return e;
        }
        let mut b = Vec::new();
        s.transmit(&mut b);
        let _ = c.read_tls(&mut &b[..]);
        let _ = c.process_new_packets();
    }
    panic!("the server took a client without a certificate");
}

/// Two pipes over four TLS connections: each joins its pipe once its handshake is over,
/// and a session's messages arrive intact.
#[test]
fn a_pipe_runs_over_tls_connections() {
    let ca = TestCa::new("toemu test CA").unwrap();
    let (ci, si) = pair(&ca, "backup-client", "store-1");
    let (mut a, mut b) = (
        Pipe::new(PipeConfig::default()),
        Pipe::new(PipeConfig::default()),
    );
    let mut links: Vec<(Tls, Tls)> = (0..4)
        .map(|_| {
            let mut c = Tls::client(&ci, "store-1", NOW).unwrap();
            let mut s = Tls::server(&si, NOW).unwrap();
            handshake(&mut c, &mut s).unwrap();
            assert_eq!(a.add_conn(), b.add_conn());
            (c, s)
        })
        .collect();
    let s = a.open("store-1");
    let want: Vec<Vec<u8>> = (0..5).map(|i| vec![i as u8; 300_000]).collect();
    let mut sent = 0;
    let mut got = Vec::new();
    for _ in 0..10_000 {
        for (i, (c, sv)) in links.iter_mut().enumerate() {
            let mut plain = Vec::new();
            a.fill(i, &mut plain, 64 << 10, 0);
            assert_eq!(c.send(&plain), plain.len());
            let mut wire = Vec::new();
            c.transmit(&mut wire);
            let mut p = Vec::new();
            sv.receive(&wire, &mut p).unwrap();
            b.on_bytes(i, &p, 0);
            let mut plain = Vec::new();
            b.fill(i, &mut plain, 64 << 10, 0);
            assert_eq!(sv.send(&plain), plain.len());
            let mut wire = Vec::new();
            sv.transmit(&mut wire);
            let mut p = Vec::new();
            c.receive(&wire, &mut p).unwrap();
            a.on_bytes(i, &p, 0);
        }
        while let Some(e) = b.poll_event() {
            match e {
                PipeEvent::Session {
                    id,
                    event: Event::Incoming { principal },
                } => {
                    assert_eq!(principal, si.name);
                    b.session(id).unwrap().accept();
                }
                PipeEvent::Session {
                    id,
                    event: Event::Received { .. },
                } => {
                    got.push(b.session(id).unwrap().recv(0).unwrap().1);
                }
                _ => {}
            }
        }
        while a.poll_event().is_some() {}
        if let Some(sess) = a.session(s) {
            while sent < want.len() && sess.send(want[sent].clone(), 0).is_ok() {
                sent += 1;
            }
        }
        if got.len() == want.len() {
            break;
        }
    }
    assert!(
        got == want,
        "{} of {} sent, {} received",
        sent,
        want.len(),
        got.len()
    );
}
