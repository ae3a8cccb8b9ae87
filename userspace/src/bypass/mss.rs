//! The bypass stack's MSS: what its SYN-ACKs offer and the most it sends per segment. Unless
//! `tcp.mss` sets it, it follows the MTU of the interface the bypass listeners are on, read
//! once at start: a veth or NIC with a larger MTU then carries fewer, larger segments, and the
//! per-segment costs (stack, AF_XDP TX, the peer's receive) fall with it.
//!
//! Owns the rule and the MTU lookup; the start-up code ([`crate::server`]) applies it per
//! interface. The MSS is one value per stack, so an interface with an IPv6 bypass listener
//! takes the IPv6 figure (MTU − 60) for its IPv4 connections too. The UMEM frame
//! (`xdp.frame_size`) must hold a whole segment with its headers: the MSS is capped at
//! `frame_size − `[`TCP_FRAME_OVERHEAD`] (4096-byte frames for an MTU above ~2000).

use crate::config::TCP_FRAME_OVERHEAD;
use std::io;
use std::net::SocketAddr;

/// The least MSS (RFC 9293 §3.7.1's IPv4 default) and the most `tcp.mss` allows.
const MIN_MSS: u32 = 536;
const MAX_MSS: u32 = 9000;
/// IPv4 + TCP headers without options, and IPv6 + TCP (RFC 9293 §3.7.1, RFC 8200 §5).
const IPV4_HEADERS: u32 = 40;
const IPV6_HEADERS: u32 = 60;

/// The MSS for a stack serving `listeners` on an interface of `mtu` with UMEM frames of
/// `frame_size`; `explicit` (`tcp.mss`, already checked against the frame) wins.
pub fn resolve(
    explicit: Option<u16>,
    mtu: u32,
    listeners: &[SocketAddr],
    frame_size: usize,
) -> u16 {
    if let Some(mss) = explicit {
        return mss;
    }
    let headers = if listeners.iter().any(SocketAddr::is_ipv6) {
        IPV6_HEADERS
    } else {
        IPV4_HEADERS
    };
    let frame_room = u32::try_from(frame_size.saturating_sub(TCP_FRAME_OVERHEAD)).unwrap_or(0);
    let mss = mtu
        .saturating_sub(headers)
        .min(frame_room)
        .clamp(MIN_MSS, MAX_MSS);
    // Clamped to at most 9000 above.
    u16::try_from(mss).unwrap_or(MAX_MSS as u16)
}

/// The MTU of `interface` (SIOCGIFMTU), in the network namespace tern runs in.
pub fn interface_mtu(interface: &str) -> io::Result<u32> {
    // SAFETY: SIOCGIFMTU takes an ifreq and reads only its name.
    let ifr = unsafe { crate::sys::netdev::interface_ioctl(interface, libc::SIOCGIFMTU, |_| {}) }?;
    // SAFETY: SIOCGIFMTU succeeded, so the union holds the MTU.
    let mtu = unsafe { ifr.ifr_ifru.ifru_mtu };
    u32::try_from(mtu).map_err(|_| io::Error::other(format!("{interface}: MTU {mtu}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4() -> Vec<SocketAddr> {
        vec!["10.0.0.1:443".parse().expect("addr")]
    }

    #[test]
    fn follows_the_mtu_within_the_frame() {
        assert_eq!(resolve(None, 1500, &v4(), 2048), 1460);
        let both = vec![v4()[0], "[fd00::1]:443".parse().expect("addr")];
        assert_eq!(resolve(None, 1500, &both, 2048), 1440, "IPv6 headers");
        // A 2048-byte frame holds at most 2048 − 114 bytes of payload.
        assert_eq!(resolve(None, 3500, &v4(), 2048), 1934);
        assert_eq!(resolve(None, 3500, &v4(), 4096), 3460);
        assert_eq!(resolve(None, 65535, &v4(), 4096), 3982);
        assert_eq!(resolve(None, 576, &v4(), 2048), 536, "never below 536");
    }

    #[test]
    fn an_explicit_mss_wins() {
        assert_eq!(resolve(Some(1200), 9000, &v4(), 4096), 1200);
    }

    #[test]
    fn loopback_has_an_mtu_and_nonsense_is_refused() {
        assert!(interface_mtu("lo").map(|m| m >= 1280).unwrap_or(false));
        assert!(interface_mtu("").is_err());
        assert!(interface_mtu("no-such-if-x").is_err());
    }
}
