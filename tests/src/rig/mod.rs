//! The veth/netns rig: network namespaces ([`Netns`]) and a client namespace joined to a server
//! side by one veth pair ([`Rig`]), a veth pair between any two namespaces ([`NsLink`], e.g.
//! two rigs' server namespaces as two hosts), plus the [`TernProcess`] and [`TempDir`] guards.
//!
//! Owns: creating and deleting namespaces, veth pairs and their IPv4 addresses with `ip`
//! (iproute2), and entering a namespace from a thread with `setns(2)`. It does not own what runs
//! inside the namespaces (see [`crate::backend`] and [`TernProcess`]).
//!
//! Names are unique per process and per call (`tn-<tag>-<pid>-<n>` for namespaces, at most 15
//! bytes for interfaces, IFNAMSIZ - 1), so tests run in parallel. Each rig gets its own
//! 10.x.y.0/24 with x in 200..=255; for a host rig (server side = the host namespace)
//! a /24 that overlaps anything on the host's routing tables is skipped. Both veth ends get
//! MTU 1500: native XDP on veth needs the peer's MTU ≤ 3506 unless the program is frags-aware.
//!
//! **Offloads.** The client-side veth gets TX checksum offload, TSO and GSO turned off
//! (`SIOCETHTOOL` legacy commands `ETHTOOL_STXCSUM` / `ETHTOOL_STSO` / `ETHTOOL_SGSO`; the
//! `ethtool` binary is not needed) and the rig checks with the matching `GET` commands that they
//! are off, panicking otherwise. With TX checksum offload on, veth hands the peer — and an
//! AF_XDP socket behind it — TCP segments whose checksum field holds only the pseudo-header sum;
//! a real NIC delivers complete checksums, and tern verifies them. Without TSO/GSO every frame
//! leaving the client veth is at most one MTU, as on a wire. (The kernel's TCP still builds
//! multi-segment skbs and segments them in software after the tc egress hook; the loss injector
//! ([`crate::loss`]) sets `gso_max_segs 1` for as long as it is attached, so its classifier
//! sees one segment per skb.) [`Rig::isolated_with`] and [`ClientOffloads::Default`] keep the
//! pair as `ip link add … type veth` makes it instead, offloads on: what a user gets, and what
//! tern's `tcp.rx_checksum = "auto"` is for.
//! Every guard removes what it made on drop, also while unwinding from a panic; a name left
//! over by a killed process with the same PID is deleted and reused (a live process cannot share
//! our PID, so such a leftover is stale).

mod process;
mod tempdir;

pub use process::{tern_binary, TernOptions, TernProcess};
pub use tempdir::TempDir;

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::thread::JoinHandle;

/// Per-process counter behind every unique name (namespaces, links, subnets, temp dirs).
static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// `ip netns add` makes `/run/netns` a shared mount the first time; concurrent first calls from
/// several threads can trip over each other, so creation is serialised within the process.
static NETNS_ADD: Mutex<()> = Mutex::new(());

/// First octet pair of the private test range: subnets are 10.(200+x).y.0/24.
const SUBNET_BASE: u8 = 200;
/// Number of /24 subnets in 10.200.0.0 – 10.255.255.0.
const SUBNETS: u32 = (256 - SUBNET_BASE as u32) * 256;
/// MTU of both veth ends (≤ 3506 so native XDP attaches to either end).
pub const RIG_MTU: u32 = 1500;

pub(crate) fn next_id() -> u32 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// Runs `ip <args>`; on failure returns the command line and its stderr.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            format!(
                "cannot run `ip {}` (is iproute2 installed?): {e}",
                args.join(" ")
            )
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs `ip <args>` and returns its stdout, panicking with the stderr on failure.
#[track_caller]
fn ip_output(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip {}`: {e}", args.join(" ")));
    assert!(
        out.status.success(),
        "`ip {}` failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[track_caller]
fn ip_ok(args: &[&str]) {
    if let Err(e) = ip(args) {
        panic!("rig: {e}");
    }
}

/// Tags become part of namespace names; keep them short and shell-friendly.
#[track_caller]
fn check_tag(tag: &str) {
    assert!(
        !tag.is_empty()
            && tag.len() <= 24
            && tag
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
        "rig tag {tag:?} must be 1..=24 chars of [a-z0-9-]"
    );
}

/// A named network namespace (`/run/netns/<name>`), with its loopback up.
///
/// Dropping it runs `ip netns del`. Processes or threads still inside keep the namespace alive
/// in the kernel until they leave, but the name is gone.
#[derive(Debug)]
pub struct Netns {
    /// `tn-<tag>-<pid>-<n>`: unique among live processes, never reused within this process.
    pub name: String,
}

impl Netns {
    /// Creates `tn-<tag>-<pid>-<n>` and brings its loopback up. Panics if `ip` fails.
    #[track_caller]
    pub fn new(tag: &str) -> Netns {
        check_tag(tag);
        let name = format!("tn-{tag}-{}-{}", std::process::id(), next_id());
        {
            let _serialised = NETNS_ADD.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(first) = ip(&["netns", "add", &name]) {
                // Most likely a leftover from a killed process that had our PID: delete, retry.
                let _ = ip(&["netns", "del", &name]);
                if let Err(second) = ip(&["netns", "add", &name]) {
                    panic!("rig: cannot create namespace {name}: {first}; retry: {second}");
                }
            }
        }
        // From here on Drop deletes the namespace, also if bringing lo up panics.
        let ns = Netns { name };
        ip_ok(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    /// `/run/netns/<name>`, the bind mount that `setns(2)` opens.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// `ip netns exec <name> <program>`: add arguments, then run it. `ip netns exec` execs the
    /// program in place (no fork), so the child's PID is the program's PID.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Moves the calling thread into this namespace (`setns(fd, CLONE_NEWNET)`). Only this
    /// thread changes namespace; sockets it creates afterwards live in this namespace.
    #[track_caller]
    pub fn enter_current_thread(&self) {
        enter_netns_path(&self.path());
    }

    /// Spawns a thread that enters this namespace and then runs `f`.
    ///
    /// The namespace file is opened here, before the thread starts, so a missing namespace
    /// panics in the caller; the thread panics if `setns` fails.
    #[track_caller]
    pub fn spawn<T, F>(&self, f: F) -> JoinHandle<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let file = open_netns(&self.path());
        let label = format!("ns:{}", self.name);
        std::thread::Builder::new()
            .name(label)
            .spawn(move || {
                setns_file(&file);
                drop(file);
                f()
            })
            .unwrap_or_else(|e| panic!("rig: cannot spawn a thread for {}: {e}", self.name))
    }

    /// Runs `f` on a thread inside this namespace and returns its result (a panic in `f` is
    /// re-raised here). Handy for binding a listener inside the namespace:
    /// `ns.run(|| TcpListener::bind("127.0.0.1:0").expect("bind"))`.
    #[track_caller]
    pub fn run<T, F>(&self, f: F) -> T
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        match self.spawn(f).join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            // Never panic in drop (it may run while unwinding); say what was left behind.
            eprintln!("rig: could not delete namespace {}: {e}", self.name);
        }
    }
}

/// A veth pair joining two namespaces ([`Netns::link_to`]), each end with an address of a /24
/// of its own (`.1` in the first namespace, `.2` in the other): two "hosts" on one wire.
///
/// Drop deletes the pair (deleting one end deletes both); declare it before the namespaces it
/// joins so that it goes first.
#[derive(Debug)]
pub struct NsLink {
    /// The namespace of [`NsLink::local_if`] (the one `link_to` was called on).
    local_ns: String,
    /// The end in the namespace `link_to` was called on. ≤ 15 bytes.
    pub local_if: String,
    /// The end in the other namespace. ≤ 15 bytes.
    pub remote_if: String,
    /// `<subnet>.1/24` on `local_if`.
    pub local_ip: Ipv4Addr,
    /// `<subnet>.2/24` on `remote_if`.
    pub remote_ip: Ipv4Addr,
}

impl NsLink {
    /// `(local_ip, remote_ip)`.
    pub fn addrs(&self) -> (Ipv4Addr, Ipv4Addr) {
        (self.local_ip, self.remote_ip)
    }
}

impl Drop for NsLink {
    fn drop(&mut self) {
        if let Err(e) = ip(&["-n", &self.local_ns, "link", "del", &self.local_if]) {
            eprintln!("rig: could not delete veth {}: {e}", self.local_if);
        }
    }
}

impl Netns {
    /// Joins this namespace to `other` by a new veth pair (MTU [`RIG_MTU`], both ends up) with
    /// a /24 of its own, so that processes in the two reach each other over a link rather than
    /// a shared loopback. Panics if `ip` fails (the pair, once made, is deleted on unwind).
    #[track_caller]
    pub fn link_to(&self, other: &Netns) -> NsLink {
        let id = next_id();
        let pid = std::process::id();
        // Same scheme as the rig's veths, with "a"/"b" ends: unique per process and call.
        let base = format!("t{pid:x}-{id:x}");
        let (local_if, remote_if) = (format!("{base}a"), format!("{base}b"));
        assert!(
            local_if.len() <= 15,
            "rig: interface name {local_if} is longer than IFNAMSIZ - 1"
        );
        // Both ends live in namespaces of ours, so no host route can clash with the subnet.
        let subnet = pick_subnet(pid, id, false);
        let mtu = RIG_MTU.to_string();
        ip_ok(&[
            "-n",
            &self.name,
            "link",
            "add",
            &local_if,
            "mtu",
            &mtu,
            "type",
            "veth",
            "peer",
            "name",
            &remote_if,
            "mtu",
            &mtu,
            "netns",
            &other.name,
        ]);
        // From here on Drop deletes the pair, also if an address or `up` below fails.
        let link = NsLink {
            local_ns: self.name.clone(),
            local_if,
            remote_if,
            local_ip: Ipv4Addr::new(10, subnet[0], subnet[1], 1),
            remote_ip: Ipv4Addr::new(10, subnet[0], subnet[1], 2),
        };
        for (ns, interface, addr) in [
            (self, &link.local_if, link.local_ip),
            (other, &link.remote_if, link.remote_ip),
        ] {
            let cidr = format!("{addr}/24");
            ip_ok(&["-n", &ns.name, "addr", "add", &cidr, "dev", interface]);
            ip_ok(&["-n", &ns.name, "link", "set", interface, "up"]);
        }
        link
    }
}

#[track_caller]
fn open_netns(path: &std::path::Path) -> File {
    File::open(path).unwrap_or_else(|e| panic!("rig: cannot open {}: {e}", path.display()))
}

#[track_caller]
fn setns_file(file: &File) {
    // SAFETY: `file` is an open descriptor of a network-namespace bind mount for the duration
    // of the call, and CLONE_NEWNET is a valid nstype; setns only changes this thread's
    // network namespace and touches no memory of ours.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert!(
        rc == 0,
        "rig: setns(CLONE_NEWNET) failed: {}",
        std::io::Error::last_os_error()
    );
}

/// Moves the calling thread into the namespace at `path` (a `/run/netns/<name>` bind mount).
#[track_caller]
pub(crate) fn enter_netns_path(path: &std::path::Path) {
    setns_file(&open_netns(path));
}

/// A client namespace joined by one veth pair to a server side, which is either its own
/// namespace ([`Rig::isolated`], for tests) or the host namespace ([`Rig::host`], for
/// `cargo xtask run`). Addresses: `server_ip` = .1 and `client_ip` = .2 of a /24 unique per rig.
///
/// What the rig does to the client veth's offloads (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientOffloads {
    /// TX checksum offload, TSO and GSO off: complete checksums, frames of at most one MTU.
    Off,
    /// Left as the kernel made them (TX checksum offload on: partial checksums).
    Default,
}

/// Drop deletes the veth pair and the namespaces.
#[derive(Debug)]
pub struct Rig {
    /// The namespace the clients (curl, openssl, test code) run in.
    pub client: Netns,
    /// The server namespace; `None` means the server side is the host namespace.
    pub server: Option<Netns>,
    /// The server-side veth end (lives in `server`, or in the host namespace). ≤ 15 bytes.
    pub server_if: String,
    /// The client-side veth end (lives in `client`). ≤ 15 bytes.
    pub client_if: String,
    /// `<subnet>.1/24` on `server_if`.
    pub server_ip: Ipv4Addr,
    /// `<subnet>.2/24` on `client_if`.
    pub client_ip: Ipv4Addr,
    /// `numtxqueues` = `numrxqueues` on both veth ends.
    pub queues: u32,
}

impl Rig {
    /// Server side in its own namespace: nothing touches the host. For tests.
    #[track_caller]
    pub fn isolated(tag: &str, queues: u32) -> Rig {
        Rig::build(tag, queues, true, ClientOffloads::Off)
    }

    /// [`Rig::isolated`], with the client veth's offloads as `offloads` says.
    #[track_caller]
    pub fn isolated_with(tag: &str, queues: u32, offloads: ClientOffloads) -> Rig {
        Rig::build(tag, queues, true, offloads)
    }

    /// Server side is the host namespace (tern runs as a normal host process and its backends
    /// can be on the host's loopback). For `cargo xtask run`.
    #[track_caller]
    pub fn host(tag: &str, queues: u32) -> Rig {
        Rig::build(tag, queues, false, ClientOffloads::Off)
    }

    #[track_caller]
    fn build(tag: &str, queues: u32, isolated: bool, offloads: ClientOffloads) -> Rig {
        check_tag(tag);
        assert!(
            (1..=256).contains(&queues),
            "rig: queues must be 1..=256, got {queues}"
        );
        let id = next_id();
        let pid = std::process::id();
        // "t" + pid in hex (≤ 6 digits, pid_max ≤ 2^22) + "-" + id in hex + "s"/"c" ≤ 15 bytes
        // for the first 16^6 rigs of a process.
        let base = format!("t{pid:x}-{id:x}");
        let server_if = format!("{base}s");
        let client_if = format!("{base}c");
        assert!(
            server_if.len() <= 15,
            "rig: interface name {server_if} is longer than IFNAMSIZ - 1"
        );
        let client = Netns::new(&format!("{tag}-c"));
        let server = isolated.then(|| Netns::new(&format!("{tag}-s")));
        let subnet = pick_subnet(pid, id, !isolated);
        let server_ip = Ipv4Addr::new(10, subnet[0], subnet[1], 1);
        let client_ip = Ipv4Addr::new(10, subnet[0], subnet[1], 2);
        // Constructed before the link exists so that a panic below still deletes the
        // namespaces (and the host-side link, whose deletion failure Drop only reports).
        let rig = Rig {
            client,
            server,
            server_if,
            client_if,
            server_ip,
            client_ip,
            queues,
        };
        rig.create_link();
        if offloads == ClientOffloads::Off {
            rig.disable_client_offloads();
        }
        rig
    }

    /// Whether the client veth has TX checksum offload on (it sends partial checksums).
    pub fn client_tx_checksum_offload(&self) -> Result<bool, String> {
        let interface = self.client_if.clone();
        self.client
            .run(move || ethtool(&interface, ETHTOOL_GTXCSUM, 0).map(|on| on != 0))
    }

    /// Turns TX checksum offload, TSO and GSO off on `client_if` and checks that they are off
    /// (see the module docs for why). Panics with the interface and the failing command.
    #[track_caller]
    fn disable_client_offloads(&self) {
        let interface = self.client_if.clone();
        let netns = self.client.name.clone();
        if let Err(e) = self.client.run(move || disable_offloads(&interface)) {
            panic!("rig: offloads of {} in {netns}: {e}", self.client_if);
        }
    }

    #[track_caller]
    fn create_link(&self) {
        let q = self.queues.to_string();
        let mtu = RIG_MTU.to_string();
        let mut args: Vec<&str> = vec![
            "link",
            "add",
            &self.server_if,
            "mtu",
            &mtu,
            "numtxqueues",
            &q,
            "numrxqueues",
            &q,
        ];
        if let Some(server) = &self.server {
            args.extend(["netns", &server.name]);
        }
        args.extend([
            "type",
            "veth",
            "peer",
            "name",
            &self.client_if,
            "mtu",
            &mtu,
            "numtxqueues",
            &q,
            "numrxqueues",
            &q,
            "netns",
            &self.client.name,
        ]);
        if let Err(first) = ip(&args) {
            // Only the host-side name can collide (with a stale link of a dead process).
            if self.server.is_none() {
                let _ = ip(&["link", "del", &self.server_if]);
            }
            if let Err(second) = ip(&args) {
                panic!("rig: cannot create veth pair: {first}; retry: {second}");
            }
        }
        let server_cidr = format!("{}/24", self.server_ip);
        let client_cidr = format!("{}/24", self.client_ip);
        let mut server_args: Vec<&str> = Vec::new();
        if let Some(server) = &self.server {
            server_args.extend(["-n", &server.name]);
        }
        let with = |prefix: &[&str], rest: &[&str]| -> Vec<String> {
            prefix.iter().chain(rest).map(|s| s.to_string()).collect()
        };
        let run = |args: Vec<String>| {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            ip_ok(&refs);
        };
        run(with(
            &server_args,
            &["addr", "add", &server_cidr, "dev", &self.server_if],
        ));
        run(with(&server_args, &["link", "set", &self.server_if, "up"]));
        let client_args = ["-n", self.client.name.as_str()];
        run(with(
            &client_args,
            &["addr", "add", &client_cidr, "dev", &self.client_if],
        ));
        run(with(&client_args, &["link", "set", &self.client_if, "up"]));
    }

    /// The server namespace, or `None` for the host namespace.
    pub fn server_netns(&self) -> Option<&Netns> {
        self.server.as_ref()
    }

    /// `program` run on the server side (`ip netns exec <server> program`, or plainly).
    pub fn server_command(&self, program: &str) -> Command {
        match &self.server {
            Some(ns) => ns.command(program),
            None => Command::new(program),
        }
    }

    /// `program` run in the client namespace.
    pub fn client_command(&self, program: &str) -> Command {
        self.client.command(program)
    }

    /// Spawns a thread on the server side (inside the server namespace, if any).
    #[track_caller]
    pub fn server_spawn<T, F>(&self, f: F) -> JoinHandle<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        match &self.server {
            Some(ns) => ns.spawn(f),
            None => std::thread::spawn(f),
        }
    }

    /// Runs `f` on the server side and returns its result (see [`Netns::run`]).
    #[track_caller]
    pub fn server_run<T, F>(&self, f: F) -> T
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        match self.server_spawn(f).join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// `server_ip:port`.
    pub fn server_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.server_ip, port))
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        // Deleting one end deletes the pair. Done explicitly (rather than relying on namespace
        // teardown) so the link is gone now even if a process still pins a namespace.
        let result = match &self.server {
            Some(server) => ip(&["-n", &server.name, "link", "del", &self.server_if]),
            None => ip(&["link", "del", &self.server_if]),
        };
        if let Err(e) = result {
            eprintln!("rig: could not delete veth {}: {e}", self.server_if);
        }
        // The namespaces are deleted by their own Drop, right after this.
    }
}

/// `SIOCETHTOOL` (linux/sockios.h).
const SIOCETHTOOL: libc::c_ulong = 0x8946;
// Legacy ethtool commands (linux/ethtool.h), each taking a `struct ethtool_value`.
const ETHTOOL_GTXCSUM: u32 = 0x16;
const ETHTOOL_STXCSUM: u32 = 0x17;
const ETHTOOL_GTSO: u32 = 0x1e;
const ETHTOOL_STSO: u32 = 0x1f;
const ETHTOOL_GGSO: u32 = 0x23;
const ETHTOOL_SGSO: u32 = 0x24;

/// `struct ethtool_value`.
#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// One legacy ethtool command on `interface` of the calling thread's namespace: `data` is the
/// value to set (ignored by `GET` commands); returns the value the kernel left in `data`.
fn ethtool(interface: &str, cmd: u32, data: u32) -> Result<u32, String> {
    let name = interface.as_bytes();
    if name.len() >= libc::IFNAMSIZ {
        return Err(format!("interface name {interface} is too long"));
    }
    // Any socket will do for the ioctl; socket2 sets SOCK_CLOEXEC.
    let fd = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)
        .map_err(|e| format!("socket: {e}"))?;
    let mut value = EthtoolValue { cmd, data };
    // SAFETY: all-zero is a valid `ifreq` (a name and a union of plain data and pointers).
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name) {
        *dst = *src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_data = std::ptr::addr_of_mut!(value).cast();
    // SAFETY: SIOCETHTOOL reads the NUL-terminated name and the `ethtool_value` that
    // `ifru_data` points to, and writes back only into that value; both outlive the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), SIOCETHTOOL as _, &mut ifr) };
    if rc < 0 {
        return Err(format!(
            "SIOCETHTOOL command {cmd:#x}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(value.data)
}

/// Turns TX checksum offload, TSO and GSO off on `interface` (calling thread's namespace) and
/// reads them back; `Err` names whatever is still on.
pub(crate) fn disable_offloads(interface: &str) -> Result<(), String> {
    // Checksum offload first: TSO depends on it, so the kernel may already drop TSO with it.
    for (set, get, what) in [
        (ETHTOOL_STXCSUM, ETHTOOL_GTXCSUM, "tx checksum offload"),
        (ETHTOOL_STSO, ETHTOOL_GTSO, "TSO"),
        (ETHTOOL_SGSO, ETHTOOL_GGSO, "GSO"),
    ] {
        ethtool(interface, set, 0).map_err(|e| format!("turning {what} off: {e}"))?;
        let now = ethtool(interface, get, 0).map_err(|e| format!("reading {what}: {e}"))?;
        if now != 0 {
            return Err(format!("{what} is still on after turning it off"));
        }
    }
    Ok(())
}

/// Sets TX checksum offload on `interface` (calling thread's namespace) and returns the state
/// read back. For tests that need the veth default back (the negative control of the checksum
/// test).
#[cfg(test)]
pub(crate) fn set_tx_checksum_offload(interface: &str, on: bool) -> Result<bool, String> {
    ethtool(interface, ETHTOOL_STXCSUM, u32::from(on))?;
    Ok(ethtool(interface, ETHTOOL_GTXCSUM, 0)? != 0)
}

/// Picks the second and third octets of a 10.x.y.0/24 for a rig: derived from the PID and the
/// per-process id so concurrent rigs differ; for host rigs also free on the host.
#[track_caller]
fn pick_subnet(pid: u32, id: u32, check_host: bool) -> [u8; 2] {
    // A stride coprime to SUBNETS spreads processes apart; `id` steps within a process.
    let start = (pid.wrapping_mul(2_654_435_761) % SUBNETS + id) % SUBNETS;
    let taken = if check_host {
        host_prefixes()
    } else {
        Vec::new()
    };
    for step in 0..SUBNETS {
        let index = (start + step) % SUBNETS;
        let octets = [SUBNET_BASE + (index / 256) as u8, (index % 256) as u8];
        let net = u32::from(Ipv4Addr::new(10, octets[0], octets[1], 0));
        if !taken
            .iter()
            .any(|&(addr, len)| overlaps(net, 24, addr, len))
        {
            return octets;
        }
    }
    panic!("rig: every /24 in 10.200.0.0-10.255.255.0 overlaps a route on this host");
}

/// Every IPv4 prefix mentioned in the host's addresses and routing tables (all tables).
#[track_caller]
fn host_prefixes() -> Vec<(u32, u8)> {
    let text = ip_output(&["-4", "route", "show", "table", "all"])
        + &ip_output(&["-4", "-o", "addr", "show"]);
    text.split_whitespace().filter_map(parse_prefix).collect()
}

/// `a.b.c.d` or `a.b.c.d/len` → (address, len); anything else → None.
fn parse_prefix(token: &str) -> Option<(u32, u8)> {
    let (addr, len) = match token.split_once('/') {
        Some((a, l)) => (a, l.parse::<u8>().ok().filter(|&l| l <= 32)?),
        None => (token, 32),
    };
    let addr: Ipv4Addr = addr.parse().ok()?;
    // 0.0.0.0/0 (a default route) would overlap everything and is not a subnet in use.
    (len > 0).then_some((u32::from(addr), len))
}

/// Whether two IPv4 prefixes share any address: they agree on the shorter prefix length.
fn overlaps(a: u32, a_len: u8, b: u32, b_len: u8) -> bool {
    let len = a_len.min(b_len);
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    a & mask == b & mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_overlap_rules() {
        let net = |s: &str| parse_prefix(s).expect("valid prefix");
        let (a, al) = net("10.200.3.0/24");
        let (b, bl) = net("10.200.3.7");
        assert!(overlaps(a, al, b, bl), "host address inside the /24");
        let (c, cl) = net("10.200.4.0/24");
        assert!(!overlaps(a, al, c, cl), "neighbouring /24s are disjoint");
        let (d, dl) = net("10.0.0.0/8");
        assert!(overlaps(a, al, d, dl), "a covering /8 overlaps");
        assert_eq!(parse_prefix("default"), None);
        assert_eq!(parse_prefix("0.0.0.0/0"), None);
        assert_eq!(parse_prefix("10.1.2.3/33"), None);
    }

    /// The packet type (`sll_pkttype`, e.g. `PACKET_OUTGOING`) of a link-layer source address
    /// `recv_from` returned; `None` for any other family.
    fn link_packet_type(addr: &socket2::SockAddr) -> Option<u8> {
        if addr.family() != libc::AF_PACKET as libc::sa_family_t {
            return None;
        }
        let mut storage = addr.clone().as_storage();
        // SAFETY: the family says the storage holds a sockaddr_ll.
        Some(unsafe { storage.view_as::<libc::sockaddr_ll>() }.sll_pkttype)
    }

    /// An AF_PACKET socket capturing every frame an interface receives (not the ones it sends).
    struct Capture(socket2::Socket);

    impl Capture {
        /// Opens it on `interface` of the calling thread's namespace.
        fn open(interface: &str) -> Capture {
            let name = std::ffi::CString::new(interface).expect("interface name");
            // SAFETY: `name` is a valid NUL-terminated string.
            let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
            assert_ne!(ifindex, 0, "no interface {interface}");
            let protocol = (libc::ETH_P_ALL as u16).to_be();
            let socket = socket2::Socket::new(
                socket2::Domain::PACKET,
                socket2::Type::RAW,
                Some(socket2::Protocol::from(i32::from(protocol))),
            )
            .expect("socket(AF_PACKET)");
            let addr = crate::pktgen::link_addr(ifindex as i32, protocol, None);
            socket.bind(&addr).expect("bind(AF_PACKET)");
            socket
                .set_read_timeout(Some(std::time::Duration::from_millis(200)))
                .expect("SO_RCVTIMEO");
            socket.set_recv_buffer_size(4 << 20).expect("SO_RCVBUF");
            Capture(socket)
        }

        /// Every received frame queued so far (stops at the first 200 ms without one).
        fn drain(&self) -> Vec<Vec<u8>> {
            let mut frames = Vec::new();
            loop {
                let mut buf = vec![0u8; 65536];
                // SAFETY: socket2 documents that `recv_from` never writes uninitialised bytes,
                // so an initialised buffer may be passed as `MaybeUninit`.
                let uninit = unsafe {
                    &mut *(buf.as_mut_slice() as *mut [u8] as *mut [std::mem::MaybeUninit<u8>])
                };
                let Ok((n, from)) = self.0.recv_from(uninit) else {
                    return frames;
                };
                // PACKET_OUTGOING (4): a frame this side sent; only received ones count.
                if link_packet_type(&from) != Some(4) {
                    buf.truncate(n);
                    frames.push(buf);
                }
            }
        }
    }

    /// Sends `bytes` from the client namespace to a listener on the server side and returns the
    /// TCP data segments (payload > 0) from the client that the server's veth end received,
    /// each with its length and what parsing it with `mode` found in its checksum field.
    fn client_data_segments(
        rig: &Rig,
        listener: std::net::TcpListener,
        capture: &Capture,
        bytes: usize,
        mode: tern::wire::ChecksumMode,
    ) -> Vec<Result<(usize, tern::wire::ChecksumVerdict), tern::wire::WireError>> {
        use std::io::{Read, Write};
        let addr = listener.local_addr().expect("local_addr");
        let sink = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().expect("accept");
            let mut received = Vec::new();
            stream.read_to_end(&mut received).expect("read");
            received.len()
        });
        rig.client.run(move || {
            let mut stream =
                std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))
                    .expect("connect");
            stream.write_all(&vec![0x5a; bytes]).expect("write");
        });
        assert_eq!(sink.join().expect("sink thread"), bytes, "bytes received");
        let client_ip = std::net::IpAddr::V4(rig.client_ip);
        capture
            .drain()
            .iter()
            .filter_map(|frame| {
                let unchecked = tern::wire::parse_tcp_frame(frame, tern::wire::ChecksumMode::Skip)
                    .ok()
                    .filter(|f| f.ip.src_addr() == client_ip && !f.payload.is_empty())?;
                let len = unchecked.payload.len();
                Some(tern::wire::parse_tcp_frame(frame, mode).map(|f| (len, f.checksum)))
            })
            .collect()
    }

    /// The rig's client veth has TX checksum offload and TSO/GSO off, so the server side
    /// receives complete checksums (as from a NIC) in frames of at most one MTU; with TX
    /// checksum offload back on, the same capture sees the partial checksums the rig avoids,
    /// and each is exactly what `ChecksumMode::AcceptPartial` takes (the pseudo-header sum).
    #[test]
    fn client_segments_reach_the_server_with_complete_checksums() {
        use tern::wire::{ChecksumMode, ChecksumVerdict, WireError};
        let rig = Rig::isolated("csum", 1);
        let server = rig.server.as_ref().expect("isolated rig");
        let (server_if, server_ip) = (rig.server_if.clone(), rig.server_ip);
        let (listener, capture) = server.run(move || {
            let listener = std::net::TcpListener::bind((server_ip, 0)).expect("bind");
            (listener, Capture::open(&server_if))
        });
        let segments =
            client_data_segments(&rig, listener, &capture, 32 * 1024, ChecksumMode::Compute);
        assert!(
            segments.len() >= 10,
            "too few data segments captured: {segments:?}"
        );
        let mss = RIG_MTU as usize - 40;
        for segment in &segments {
            let (len, _) = segment
                .as_ref()
                .unwrap_or_else(|e| panic!("a client segment failed to parse/verify: {e}"));
            assert!(*len <= mss, "a {len}-byte segment: TSO/GSO is not off");
        }

        // Negative control: the check above can fail.
        let client_if = rig.client_if.clone();
        let on = rig
            .client
            .run(move || set_tx_checksum_offload(&client_if, true));
        assert_eq!(on, Ok(true), "turning tx checksum offload back on");
        let bind = move || std::net::TcpListener::bind((server_ip, 0)).expect("bind");
        let listener = server.run(bind);
        let segments =
            client_data_segments(&rig, listener, &capture, 32 * 1024, ChecksumMode::Compute);
        assert!(
            segments.contains(&Err(WireError::BadChecksum)),
            "with offload on, veth should deliver partial checksums: {segments:?}"
        );
        let listener = server.run(bind);
        let segments = client_data_segments(
            &rig,
            listener,
            &capture,
            32 * 1024,
            ChecksumMode::AcceptPartial,
        );
        assert!(
            segments.iter().all(Result::is_ok),
            "every segment of an offloading veth peer is accepted: {segments:?}"
        );
        assert!(
            segments
                .iter()
                .any(|s| matches!(s, Ok((_, ChecksumVerdict::Partial)))),
            "and they are partial: {segments:?}"
        );
    }

    #[test]
    fn subnets_stay_in_the_test_range_and_differ_within_a_process() {
        let a = pick_subnet(4_194_303, 0, false);
        let b = pick_subnet(4_194_303, 1, false);
        assert!(a[0] >= SUBNET_BASE && b[0] >= SUBNET_BASE, "{a:?} {b:?}");
        assert_ne!(a, b, "consecutive rigs of one process got the same subnet");
    }
}
