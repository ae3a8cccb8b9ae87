//! Test-only packet loss on one interface of the rig: [`LossInjector`] loads the test-only
//! programs `tern_loss` (XDP, received frames) and `tern_loss_tc` (tc classifier, sent frames)
//! from the eBPF object embedded in tern (`tern::bypass::xdp::object()`) and attaches both to one
//! interface inside a namespace, typically the client's veth end of a [`crate::rig::Rig`]:
//! ingress loss there is server → client loss, egress loss is client → server loss.
//!
//! Only IPv4/IPv6 TCP frames are subject to loss; ARP, ICMP, neighbour discovery and anything
//! else always pass, so the rig keeps working (the rule is in `xdp-ebpf/src/loss.rs`). Each
//! eligible frame is dropped independently with probability `ppm / 1_000_000`; see
//! `tern_common::loss_rng_step` for the generator and how `seed` is used.
//!
//! **One segment per skb.** Linux TCP hands the device multi-segment (GSO) skbs even when the
//! device has GSO off, and software segmentation happens *after* the tc egress hook, so a
//! classifier would drop a whole burst at once. While attached, the injector therefore sets the
//! interface's `gso_max_segs` to 1 (TCP then builds single-segment skbs; sockets connected
//! before the change may keep larger ones) and restores the previous value on drop.
//!
//! Owns: loading, configuring, counting and detaching those two programs. The XDP program is
//! attached natively (veth supports driver XDP) through a `bpf_link`. The classifier is attached
//! as classic cls_bpf (direct action) under a `clsact` qdisc through netlink, not TCX: only there
//! does its `TC_ACT_STOLEN` verdict drop a frame silently (see `xdp-ebpf/src/loss.rs`).
//! Dropping the injector detaches both, also while unwinding from a panic; the netlink detach
//! runs on a thread inside the namespace. The `clsact` qdisc stays (empty) until the interface
//! goes. It does not own the interface, the namespace or tern's own XDP program (which may run on the
//! other end of the same veth pair).

use std::fmt;

use aya::maps::{Array, MapData, PerCpuArray};
use aya::programs::tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcAttachType};
use aya::programs::xdp::XdpLink;
use aya::programs::{links::Link as _, SchedClassifier, Xdp, XdpMode};
use aya::Ebpf;
use tern_common::{
    LossConfig, LossStats, LOSS_CONFIG_MAP, LOSS_EGRESS, LOSS_INGRESS, LOSS_PPM_MAX,
    LOSS_STATS_MAP, LOSS_TC_PROGRAM, LOSS_XDP_PROGRAM,
};

use crate::rig::Netns;

/// What the two programs counted so far (summed over CPUs). Only IPv4/IPv6 TCP frames are
/// counted; frames not subject to loss appear in neither direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LossCounts {
    /// Received TCP frames dropped by `tern_loss`.
    pub ingress_dropped: u64,
    /// Received TCP frames `tern_loss` let through.
    pub ingress_passed: u64,
    /// Sent TCP frames dropped by `tern_loss_tc`.
    pub egress_dropped: u64,
    /// Sent TCP frames `tern_loss_tc` let through.
    pub egress_passed: u64,
}

impl LossCounts {
    /// Dropped share of the received TCP frames (0 when none was seen).
    pub fn ingress_rate(&self) -> f64 {
        rate(self.ingress_dropped, self.ingress_passed)
    }

    /// Dropped share of the sent TCP frames (0 when none was seen).
    pub fn egress_rate(&self) -> f64 {
        rate(self.egress_dropped, self.egress_passed)
    }
}

fn rate(dropped: u64, passed: u64) -> f64 {
    let total = dropped + passed;
    if total == 0 {
        0.0
    } else {
        dropped as f64 / total as f64
    }
}

/// The loss programs attached to one interface; detached on drop.
pub struct LossInjector {
    interface: String,
    netns: String,
    /// `gso_max_segs` before the injector set it to 1; restored on drop.
    gso_max_segs: u32,
    // Detached explicitly in Drop (before the object, whose programs they belong to).
    xdp_link: Option<XdpLink>,
    tc_link: Option<SchedClassifierLink>,
    config: Array<MapData, LossConfig>,
    stats: PerCpuArray<MapData, LossStats>,
    seed: u64,
    // Keeps the loaded programs alive; dropped last.
    _ebpf: Ebpf,
}

impl fmt::Debug for LossInjector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LossInjector")
            .field("netns", &self.netns)
            .field("interface", &self.interface)
            .field("seed", &self.seed)
            .finish_non_exhaustive()
    }
}

impl LossInjector {
    /// Attaches loss to `interface` inside `netns`: `ingress_ppm` of the TCP frames it receives
    /// and `egress_ppm` of those it sends are dropped (parts per million, at most 1_000_000).
    /// Panics with the failing step (loading, map, attach) as tests expect.
    #[track_caller]
    pub fn attach(
        netns: &Netns,
        interface: &str,
        ingress_ppm: u32,
        egress_ppm: u32,
        seed: u64,
    ) -> LossInjector {
        check_ppm(ingress_ppm, egress_ppm);
        let gso_max_segs = gso_max_segs(netns, interface);
        set_gso_max_segs(netns, interface, 1)
            .unwrap_or_else(|err| panic!("loss injection on {interface}: {err}"));
        let name = interface.to_owned();
        let where_ = format!("{interface} in {}", netns.name);
        // Attaching resolves the interface name in the calling thread's namespace.
        let attached = netns.run(move || load_and_attach(&name, ingress_ppm, egress_ppm, seed));
        let (ebpf, xdp_link, tc_link, config, stats) =
            attached.unwrap_or_else(|err| panic!("loss injection on {where_}: {err}"));
        LossInjector {
            interface: interface.to_owned(),
            netns: netns.name.clone(),
            gso_max_segs,
            xdp_link: Some(xdp_link),
            tc_link: Some(tc_link),
            config,
            stats,
            seed,
            _ebpf: ebpf,
        }
    }

    /// Changes both rates at run time (e.g. 0, 0 to stop losing frames before a clean close).
    #[track_caller]
    pub fn set_rates(&mut self, ingress_ppm: u32, egress_ppm: u32) {
        check_ppm(ingress_ppm, egress_ppm);
        let value = LossConfig {
            ingress_ppm,
            egress_ppm,
            seed: self.seed,
        };
        self.config
            .set(0, value, 0)
            .unwrap_or_else(|err| panic!("loss injection: writing {LOSS_CONFIG_MAP}: {err}"));
    }

    /// The counters so far, summed over CPUs.
    #[track_caller]
    pub fn counts(&self) -> LossCounts {
        let read = |index: u32| -> (u64, u64) {
            let values = self
                .stats
                .get(&index, 0)
                .unwrap_or_else(|err| panic!("loss injection: reading {LOSS_STATS_MAP}: {err}"));
            values.iter().fold((0, 0), |(dropped, passed), cpu| {
                (dropped + cpu.dropped, passed + cpu.passed)
            })
        };
        let (ingress_dropped, ingress_passed) = read(LOSS_INGRESS);
        let (egress_dropped, egress_passed) = read(LOSS_EGRESS);
        LossCounts {
            ingress_dropped,
            ingress_passed,
            egress_dropped,
            egress_passed,
        }
    }

    /// The interface the programs are attached to.
    pub fn interface(&self) -> &str {
        &self.interface
    }
}

impl Drop for LossInjector {
    fn drop(&mut self) {
        // bpf_link detaches work from any thread and namespace. An interface that is already
        // gone took its attachments with it; report other failures, never panic in drop.
        if let Some(link) = self.xdp_link.take() {
            if let Err(err) = link.detach() {
                eprintln!(
                    "loss: detaching {LOSS_XDP_PROGRAM} from {}: {err}",
                    self.interface
                );
            }
        }
        // Without the namespace the interface is gone too, and with it both attachments.
        let path = std::path::PathBuf::from(format!("/run/netns/{}", self.netns));
        if !path.exists() {
            return;
        }
        if let Some(link) = self.tc_link.take() {
            // A netlink attachment is found by ifindex in the caller's namespace.
            let interface = self.interface.clone();
            let detached = std::thread::spawn(move || {
                crate::rig::enter_netns_path(&path);
                link.detach().map_err(|e| e.to_string())
            })
            .join();
            match detached {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    eprintln!("loss: detaching {LOSS_TC_PROGRAM} from {interface}: {err}")
                }
                Err(_) => eprintln!("loss: detaching {LOSS_TC_PROGRAM}: thread panicked"),
            }
        }
        let args = gso_args(&self.netns, &self.interface, self.gso_max_segs);
        if let Err(err) = ip(&args) {
            eprintln!("loss: restoring gso_max_segs of {}: {err}", self.interface);
        }
    }
}

fn gso_args(netns: &str, interface: &str, segs: u32) -> Vec<String> {
    let segs = segs.to_string();
    [
        "-n",
        netns,
        "link",
        "set",
        "dev",
        interface,
        "gso_max_segs",
        &segs,
    ]
    .map(str::to_owned)
    .to_vec()
}

fn set_gso_max_segs(netns: &Netns, interface: &str, segs: u32) -> Result<String, String> {
    ip(&gso_args(&netns.name, interface, segs))
}

/// The interface's current `gso_max_segs` (`ip -d link show`); panics if it cannot be read.
#[track_caller]
fn gso_max_segs(netns: &Netns, interface: &str) -> u32 {
    let args = ["-n", &netns.name, "-d", "link", "show", "dev", interface].map(str::to_owned);
    let shown = ip(&args).unwrap_or_else(|err| panic!("loss injection: {err}"));
    let mut words = shown.split_whitespace();
    words
        .find(|w| *w == "gso_max_segs")
        .and_then(|_| words.next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("loss injection: no gso_max_segs in `ip -d link show`:\n{shown}"))
}

/// Runs `ip <args>`; stdout on success, the command and its stderr otherwise.
fn ip(args: &[String]) -> Result<String, String> {
    let out = std::process::Command::new("ip")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `ip {}`: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

#[track_caller]
fn check_ppm(ingress_ppm: u32, egress_ppm: u32) {
    assert!(
        ingress_ppm <= LOSS_PPM_MAX && egress_ppm <= LOSS_PPM_MAX,
        "loss rates are parts per million (<= {LOSS_PPM_MAX}): ingress {ingress_ppm}, \
         egress {egress_ppm}"
    );
}

type Attached = (
    Ebpf,
    XdpLink,
    SchedClassifierLink,
    Array<MapData, LossConfig>,
    PerCpuArray<MapData, LossStats>,
);

/// Runs inside the target namespace: loads the object, writes the rates, attaches both
/// programs. Errors name the step.
fn load_and_attach(
    interface: &str,
    ingress_ppm: u32,
    egress_ppm: u32,
    seed: u64,
) -> Result<Attached, String> {
    let mut ebpf =
        Ebpf::load(tern::bypass::xdp::object()).map_err(|e| format!("loading object: {e}"))?;

    let mut config: Array<MapData, LossConfig> = ebpf
        .take_map(LOSS_CONFIG_MAP)
        .ok_or_else(|| format!("object has no map {LOSS_CONFIG_MAP}"))?
        .try_into()
        .map_err(|e| format!("map {LOSS_CONFIG_MAP}: {e}"))?;
    let stats: PerCpuArray<MapData, LossStats> = ebpf
        .take_map(LOSS_STATS_MAP)
        .ok_or_else(|| format!("object has no map {LOSS_STATS_MAP}"))?
        .try_into()
        .map_err(|e| format!("map {LOSS_STATS_MAP}: {e}"))?;
    // Rates first, so the programs never run with a stale or zero configuration.
    let value = LossConfig {
        ingress_ppm,
        egress_ppm,
        seed,
    };
    config
        .set(0, value, 0)
        .map_err(|e| format!("writing {LOSS_CONFIG_MAP}: {e}"))?;

    let xdp: &mut Xdp = ebpf
        .program_mut(LOSS_XDP_PROGRAM)
        .ok_or_else(|| format!("object has no program {LOSS_XDP_PROGRAM}"))?
        .try_into()
        .map_err(|e| format!("{LOSS_XDP_PROGRAM}: {e}"))?;
    xdp.load()
        .map_err(|e| format!("loading {LOSS_XDP_PROGRAM}: {e}"))?;
    let xdp_id = xdp
        .attach(interface, XdpMode::Driver)
        .map_err(|e| format!("attaching {LOSS_XDP_PROGRAM} (native XDP): {e}"))?;
    let xdp_link = xdp
        .take_link(xdp_id)
        .map_err(|e| format!("taking the {LOSS_XDP_PROGRAM} link: {e}"))?;

    let tc: &mut SchedClassifier = ebpf
        .program_mut(LOSS_TC_PROGRAM)
        .ok_or_else(|| format!("object has no program {LOSS_TC_PROGRAM}"))?
        .try_into()
        .map_err(|e| format!("{LOSS_TC_PROGRAM}: {e}"))?;
    tc.load()
        .map_err(|e| format!("loading {LOSS_TC_PROGRAM}: {e}"))?;
    // clsact may already be there (an earlier injector on this interface): EEXIST is fine.
    if let Err(e) = aya::programs::tc::qdisc_add_clsact(interface) {
        let exists = matches!(&e, aya::programs::tc::TcError::NetlinkError(n)
            if n.raw_os_error() == Some(libc::EEXIST));
        if !exists {
            return Err(format!("adding the clsact qdisc: {e}"));
        }
    }
    let tc_id = tc
        .attach_with_options(
            interface,
            TcAttachType::Egress,
            TcAttachOptions::Netlink(NlOptions::default()),
        )
        .map_err(|e| format!("attaching {LOSS_TC_PROGRAM} (cls_bpf on clsact egress): {e}"))?;
    let tc_link = tc
        .take_link(tc_id)
        .map_err(|e| format!("taking the {LOSS_TC_PROGRAM} link: {e}"))?;

    Ok((ebpf, xdp_link, tc_link, config, stats))
}
