//! The TLS crypto floor, in memory: what one TLS 1.3 handshake and one MiB of records cost the
//! server with tern's own `ServerConfig` ([`tern::tls::server_config`]), with no sockets, no
//! kernel and no proxying. `cargo xtask bench` divides its per-operation CPU figures by these to
//! print "x times the crypto floor".
//!
//! Owns: the criterion benchmarks `tls/handshake_server` (server-side work of one full handshake,
//! timed with `iter_custom` around the server's calls only), `tls/handshake_both` (client and
//! server, for reference), `tls/encrypt_1mib` (server → client application data: 64 records of
//! 16 KiB sealed), `tls/request_1k` (one keep-alive exchange: open a ~80-byte request record,
//! seal a 1 KiB response). Does not own: the load-level measurements (`xtask/src/bench/`).
//!
//! The setup is the one the bench targets use: ECDSA P-256 certificate, TLS 1.3 only, X25519,
//! TLS_AES_128_GCM_SHA256 (the client offers only that suite and group, as the bench's load
//! generators do), ALPN `http/1.1`, tickets on (tern's default: two NewSessionTicket messages per
//! handshake, RFC 8446 §4.6.1), aws-lc-rs provider. Bytes move between the two sides through
//! `Vec`s.

use std::hint::black_box;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, ConnectionCommon, RootCertStore, ServerConnection};
use tern::config::{Certificate, TlsSettings, TlsVersion};

const SNI: &str = "bench.test";
/// One full-size TLS record's plaintext (RFC 8446 §5.1: at most 2^14 bytes).
const RECORD: usize = 16 * 1024;
/// What a small keep-alive GET looks like on the wire (request line + Host + a header).
const REQUEST: &[u8] =
    b"GET /bytes/1024 HTTP/1.1\r\nHost: bench.test\r\nUser-Agent: tern-bench\r\n\r\n";

struct Setup {
    server: Arc<rustls::ServerConfig>,
    client: Arc<ClientConfig>,
}

fn setup() -> Setup {
    let key =
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("generate a P-256 key");
    let cert = rcgen::CertificateParams::new(vec![SNI.to_owned()])
        .expect("certificate parameters")
        .self_signed(&key)
        .expect("self-sign the certificate");
    let certificate = Certificate {
        cert_path: PathBuf::from("bench.pem"),
        key_path: PathBuf::from("bench.key"),
        chain: vec![cert.der().clone()],
        key: Arc::new(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            key.serialize_der(),
        ))),
        names: vec![SNI.to_owned()],
        default: true,
        ocsp: None,
    };
    let settings = TlsSettings {
        alpn: vec![b"http/1.1".to_vec()],
        versions: vec![TlsVersion::Tls13],
        session_cache_entries: 20_000,
        tickets: true,
        ticket_keys: None,
        client_auth: None,
        cipher_suites: None,
        groups: None,
        strict_sni: false,
    };
    let server = tern::tls::server_config(&[certificate], &settings)
        .unwrap_or_else(|e| panic!("tern's server_config refused the bench setup: {e}"));

    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites =
        vec![rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256];
    provider.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::X25519];
    let mut roots = RootCertStore::empty();
    roots
        .add(cert.der().clone())
        .expect("the self-signed certificate as trust anchor");
    let mut client = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3 with the restricted provider")
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Resumption would turn the second and later iterations into abbreviated handshakes.
    client.resumption = rustls::client::Resumption::disabled();
    Setup {
        server,
        client: Arc::new(client),
    }
}

/// Moves what `from` has to send into `to`, processes it, and returns the time `to` spent
/// (when `to` is the server and `time_to` is set) or the time `from` spent writing (when
/// `from` is the server and `time_from` is set). `wire` is scratch space, cleared on entry.
fn transfer<A: rustls::SideData, B: rustls::SideData>(
    from: &mut ConnectionCommon<A>,
    to: &mut ConnectionCommon<B>,
    wire: &mut Vec<u8>,
    time_from: bool,
    time_to: bool,
) -> Duration {
    wire.clear();
    let started = Instant::now();
    while from.wants_write() {
        from.write_tls(wire).expect("write TLS into a Vec");
    }
    let mut spent = if time_from {
        started.elapsed()
    } else {
        Duration::ZERO
    };
    let started = Instant::now();
    let mut rest = &wire[..];
    while !rest.is_empty() {
        to.read_tls(&mut rest).expect("read TLS from a slice");
        to.process_new_packets()
            .unwrap_or_else(|e| panic!("TLS error during the bench handshake: {e}"));
    }
    if time_to {
        spent += started.elapsed();
    }
    spent
}

/// One full handshake (including the server's tickets); returns the server's share of the time
/// and the connected pair.
fn handshake(setup: &Setup, wire: &mut Vec<u8>) -> (Duration, ClientConnection, ServerConnection) {
    let name = ServerName::try_from(SNI).expect("bench server name");
    let mut client =
        ClientConnection::new(Arc::clone(&setup.client), name).expect("client connection");
    let started = Instant::now();
    let mut server = ServerConnection::new(Arc::clone(&setup.server)).expect("server connection");
    let mut server_time = started.elapsed();
    // ClientHello → server flight → client Finished → tickets; bounded so a stall panics.
    for _ in 0..8 {
        server_time += transfer(&mut client, &mut server, wire, false, true);
        server_time += transfer(&mut server, &mut client, wire, true, false);
        if !client.is_handshaking() && !server.is_handshaking() && !server.wants_write() {
            assert_eq!(
                server.negotiated_cipher_suite().map(|s| s.suite()),
                Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256),
                "the bench must measure the suite the load generators negotiate"
            );
            return (server_time, client, server);
        }
    }
    panic!("the in-memory handshake did not complete in 8 rounds");
}

fn bench_handshake(c: &mut Criterion, setup: &Setup) {
    let mut group = c.benchmark_group("tls");
    group.throughput(Throughput::Elements(1));
    group.bench_function("handshake_server", |b| {
        let mut wire = Vec::with_capacity(8192);
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (spent, client, server) = handshake(setup, &mut wire);
                total += spent;
                black_box((client, server));
            }
            total
        });
    });
    group.bench_function("handshake_both", |b| {
        let mut wire = Vec::with_capacity(8192);
        b.iter(|| black_box(handshake(setup, &mut wire)));
    });
    group.finish();
}

fn bench_records(c: &mut Criterion, setup: &Setup) {
    let mut wire = Vec::with_capacity(64 * 1024);
    let (_, mut client, mut server) = handshake(setup, &mut wire);
    let plaintext = vec![0x5au8; RECORD];
    let response = vec![0xa5u8; 1024];
    let mut group = c.benchmark_group("tls");

    group.throughput(Throughput::Bytes(1 << 20));
    group.bench_function("encrypt_1mib", |b| {
        b.iter(|| {
            // Record by record, as a proxy does: rustls's outgoing buffer is bounded, so one
            // 1 MiB write would stop short.
            for _ in 0..(1 << 20) / RECORD {
                server
                    .writer()
                    .write_all(&plaintext)
                    .expect("queue one record of plaintext");
                wire.clear();
                while server.wants_write() {
                    server.write_tls(&mut wire).expect("seal into a Vec");
                }
                black_box(&wire);
            }
        });
    });

    group.throughput(Throughput::Elements(1));
    let mut request_wire = Vec::new();
    let mut got = vec![0u8; REQUEST.len()];
    group.bench_function("request_1k", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                // The client's sealing is not the server's cost: done outside the timed part.
                client.writer().write_all(REQUEST).expect("client request");
                request_wire.clear();
                while client.wants_write() {
                    client.write_tls(&mut request_wire).expect("client seal");
                }
                let started = Instant::now();
                let mut rest = &request_wire[..];
                while !rest.is_empty() {
                    server.read_tls(&mut rest).expect("server read");
                    server.process_new_packets().expect("server open");
                }
                server
                    .reader()
                    .read_exact(&mut got)
                    .expect("request plaintext");
                server.writer().write_all(&response).expect("response");
                wire.clear();
                while server.wants_write() {
                    server.write_tls(&mut wire).expect("seal the response");
                }
                total += started.elapsed();
                black_box(&wire);
            }
            total
        });
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    let setup = setup();
    bench_handshake(c, &setup);
    bench_records(c, &setup);
}

criterion_group!(tls, benches);
criterion_main!(tls);
