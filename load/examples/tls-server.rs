//! The integration tests' TLS server as a standalone program, for trying tern-load by hand
//! and for measuring the client on loopback:
//!
//! ```sh
//! cargo run -p tern-load --release --example tls-server      # prints the port and CA path
//! target/release/tern-load --mode new-conn --connect 127.0.0.1:PORT --ca CA --duration 5
//! ```
//!
//! Runs until killed. Thread-per-connection: fine for a few hundred connections, not a
//! benchmark target in itself.

#[path = "../tests/support/mod.rs"]
mod support;

fn main() {
    let server = support::TestServer::start(support::Behaviour::Http);
    println!(
        "listening on {} (sni localhost), CA {}",
        server.addr,
        server.ca_path.display()
    );
    loop {
        std::thread::park();
    }
}
