//! The bulk figure again at the rig's largest native-XDP MTU ([`LARGE_MTU`]), for tern-bypass
//! and tern-kernel: how much of the bypass path's cost per MiB is per segment.
//!
//! Owns that pass and its table: the rig's veth set to [`LARGE_MTU`] on both ends (and back to
//! [`RIG_MTU`] when the pass ends, however it ends: a guard), the target freshly started so
//! that it reads the new MTU (tern-bypass's MSS follows it; its UMEM frames are 4096 bytes
//! here, `xdp.frame_size = 4096`, since a 2048-byte frame cannot hold such a segment), an
//! unrecorded warm-up, then `runs` bulk runs like the 1,500-byte figure's. The kernel path's
//! MSS follows the MTU by itself. Bounded like every run: fixed count, each run killed at its
//! window plus slack.

use super::configs::BYPASS_XDP_TABLE;
use super::daemon::Daemon;
use super::load::{TernLoad, Workload};
use super::measure::{run_once, Ctx, Probe, Tool};
use super::results::{Measurement, TargetResult};
use super::targets::{self, Prepared, Target, LARGE_BODY};
use anyhow::{bail, Context, Result};
use std::time::Duration;
use tern_tests::rig::Rig;

/// The rig's usual MTU (what every other figure runs at).
pub const RIG_MTU: u32 = 1500;
/// The largest MTU the rig's client veth accepts while tern's XDP program (no multi-buffer
/// support) is attached in native mode to the server veth, on 4 KiB pages: the kernel caps the
/// peer at a page minus XDP headroom and `skb_shared_info` (measured: 3506 accepted, 3507
/// refused).
pub const LARGE_MTU: u32 = 3506;
/// tern-bypass's UMEM frame for this figure: a 3,506-byte MTU needs the 4096-byte frame.
const LARGE_FRAME: u32 = 4096;
/// The unrecorded warm-up before the runs.
const WARMUP: Duration = Duration::from_millis(500);

/// Whether `t` gets this figure (the two tern paths: the question is the bypass path's cost
/// per segment against the kernel's).
pub fn measured(t: Target) -> bool {
    matches!(t, Target::TernBypass | Target::TernKernel)
}

/// The runs of this figure (for the report).
pub fn runs(r: &TargetResult) -> &[Measurement] {
    &r.bulk_large_mtu
}

/// Sets both ends of the rig's veth to an MTU and restores [`RIG_MTU`] when dropped.
struct Mtu<'a> {
    rig: &'a Rig,
}

impl<'a> Mtu<'a> {
    fn set(rig: &'a Rig, mtu: u32) -> Result<Mtu<'a>> {
        // The guard exists before the first change, so a half-done change is undone too.
        let guard = Mtu { rig };
        set_mtu(rig, mtu)?;
        Ok(guard)
    }
}

impl Drop for Mtu<'_> {
    fn drop(&mut self) {
        if let Err(e) = set_mtu(self.rig, RIG_MTU) {
            eprintln!("bench: restoring the rig's MTU to {RIG_MTU}: {e:#}");
        }
    }
}

fn set_mtu(rig: &Rig, mtu: u32) -> Result<()> {
    let mtu = mtu.to_string();
    for (mut cmd, iface) in [
        (rig.server_command("ip"), &rig.server_if),
        (rig.client_command("ip"), &rig.client_if),
    ] {
        cmd.args(["link", "set", "dev", iface, "mtu", &mtu]);
        super::compare::run_captured(&mut cmd)
            .with_context(|| format!("setting the MTU of {iface} to {mtu}"))?;
    }
    Ok(())
}

/// tern-bypass's config with 4096-byte UMEM frames, next to its usual one.
fn with_large_frames(p: &Prepared) -> Result<Prepared> {
    let text = std::fs::read_to_string(&p.config)
        .with_context(|| format!("reading {}", p.config.display()))?;
    let table = format!("{BYPASS_XDP_TABLE}frame_size = {LARGE_FRAME}\n");
    let changed = text.replacen(BYPASS_XDP_TABLE, &table, 1);
    if changed == text {
        bail!(
            "{}: no [xdp] table to give 4096-byte frames",
            p.config.display()
        );
    }
    let config = p.config.with_file_name("tern-large-mtu.toml");
    std::fs::write(&config, changed).with_context(|| format!("writing {}", config.display()))?;
    let old = p.config.display().to_string();
    let new = config.display().to_string();
    let mut q = p.clone();
    q.argv = p
        .argv
        .iter()
        .map(|a| if *a == old { new.clone() } else { a.clone() })
        .collect();
    q.check_argv = p
        .check_argv
        .iter()
        .map(|a| if *a == old { new.clone() } else { a.clone() })
        .collect();
    q.config = config;
    Ok(q)
}

/// The pass for one target: MTU up, fresh start, warm-up, `runs` bulk runs, MTU back.
#[expect(
    clippy::too_many_arguments,
    reason = "the compare pass's context, passed on as the other passes take it"
)]
pub fn pass(
    ctx: &Ctx<'_>,
    rig: &Rig,
    cpu: usize,
    backend_pgid: i32,
    p: &Prepared,
    tern_load: &TernLoad,
    connections: u32,
    (runs, run_time): (u32, Duration),
    r: &mut TargetResult,
) -> Result<()> {
    let t = r.target;
    let p = if t == Target::TernBypass {
        with_large_frames(p)?
    } else {
        p.clone()
    };
    let _mtu = Mtu::set(rig, LARGE_MTU)?;
    // Declared after the guard: stopped before the MTU goes back.
    let mut daemon: Daemon = targets::start(&p, rig, cpu, ctx.interrupted)?;
    let probe = Probe {
        target_pgid: daemon.pgid(),
        backend_pgid,
    };
    let path = format!("/bytes/{LARGE_BODY}");
    let warm = tern_load.closed(Workload::Bulk, &path, connections, Duration::ZERO, WARMUP);
    run_once(
        ctx,
        &probe,
        &mut daemon,
        &format!("{} bulk MTU {LARGE_MTU} warm-up", t.name()),
        &warm,
        WARMUP,
        Tool::TernLoad,
    )?;
    for run in 0..runs {
        let argv = tern_load.closed(Workload::Bulk, &path, connections, Duration::ZERO, run_time);
        let m = run_once(
            ctx,
            &probe,
            &mut daemon,
            &format!("{} bulk-mtu{LARGE_MTU} #{}", t.name(), run + 1),
            &argv,
            run_time,
            Tool::TernLoad,
        )?;
        r.bulk_large_mtu.push(m);
    }
    Ok(())
}

/// The report's heading and prose for this figure.
pub fn heading() -> String {
    format!(
        "\n### Bulk at MTU {LARGE_MTU}\n\n`GET /bytes/1048576` on open connections, closed loop, \
         with the rig's veth at MTU {LARGE_MTU} on both ends (the largest the client veth takes \
         while tern's XDP program is attached natively to the server veth) instead of \
         {RIG_MTU}; tern-bypass with 4096-byte UMEM frames, its MSS following the MTU. tern's \
         two paths only.\n\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_frames_change_only_the_xdp_table_and_the_paths() {
        let dir = tern_tests::rig::TempDir::new("bulkmtu");
        let config = dir.join("tern.toml");
        let text = format!("[workers]\ncount = 1\n\n{BYPASS_XDP_TABLE}");
        std::fs::write(&config, &text).expect("write");
        let p = Prepared {
            target: Target::TernBypass,
            config: config.clone(),
            argv: vec![
                "tern".into(),
                "run".into(),
                "--config".into(),
                config.display().to_string(),
            ],
            check_argv: vec![
                "tern".into(),
                "check-config".into(),
                config.display().to_string(),
            ],
            control_socket: None,
            log: dir.join("log"),
        };
        let q = with_large_frames(&p).expect("derived config");
        let new = std::fs::read_to_string(&q.config).expect("read");
        assert_eq!(
            new,
            format!("[workers]\ncount = 1\n\n{BYPASS_XDP_TABLE}frame_size = 4096\n")
        );
        let value: toml::Table = new.parse().expect("valid TOML");
        assert_eq!(value["xdp"]["frame_size"].as_integer(), Some(4096));
        assert_eq!(q.argv[3], q.config.display().to_string());
        assert_eq!(q.check_argv[2], q.config.display().to_string());
        assert_ne!(q.config, p.config);
    }

    #[test]
    fn only_terns_paths() {
        assert!(measured(Target::TernBypass) && measured(Target::TernKernel));
        assert!(!measured(Target::Nginx) && !measured(Target::Hitch));
    }
}
