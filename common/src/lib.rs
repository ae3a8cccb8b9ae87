//! Types and names shared by tern's XDP program (`xdp-ebpf`) and its userspace loader
//! (`tern::xdp`), defined once so the two sides cannot disagree about a map's layout.
//!
//! This crate owns map names, program names and the `#[repr(C)]` values stored in maps. It owns
//! no logic: parsing lives in `xdp-ebpf`, loading and reading in `tern::xdp`. It is `no_std` so
//! that the eBPF target (bpfel-unknown-none, `build-std=core`) can use it; the `user` feature adds
//! the `aya::Pod` impls that userspace needs to read the maps.
//!
//! Rules for every type here (the kernel copies map values as raw bytes): `#[repr(C)]`, `Copy`,
//! no `bool` (use `u32` flags), no implicit padding, and a compile-time size check.

#![no_std]

/// ELF section / program name of the XDP entry point in the eBPF object.
pub const XDP_PROGRAM: &str = "tern_xdp";

/// Name of the per-CPU statistics map: a `PerCpuArray<XdpStats>` with [`XDP_STATS_ENTRIES`]
/// entry, indexed by [`XDP_STATS_INDEX`]. Kernel object names are at most 15 bytes.
pub const XDP_STATS_MAP: &str = "TERN_XDP_STATS";
// BPF_OBJ_NAME_LEN is 16 including the terminating NUL.
const _: () = assert!(XDP_STATS_MAP.len() <= 15);

/// Number of entries in [`XDP_STATS_MAP`]: one per-CPU [`XdpStats`] value.
pub const XDP_STATS_ENTRIES: u32 = 1;

/// The only index of [`XDP_STATS_MAP`].
pub const XDP_STATS_INDEX: u32 = 0;

/// Per-CPU packet counters kept by the XDP program. Each CPU writes only its own copy (no
/// atomics needed); userspace sums the copies on read.
///
/// Counting rule: every frame increments `packets`; then the headers are walked from the outside
/// in and each layer that parsed completely is counted (`vlan`, then `ipv4`/`ipv6`/`other`, then
/// `tcp` or `ipv4_fragments`). If a layer that the one outside it announces does not fit or has
/// an impossible field, `malformed` is counted once and the walk stops, so the outer layers that
/// did parse stay counted. Hence `ipv4 + ipv6 + other <= packets`, and the difference is the
/// frames that were malformed before reaching the IP layer.
///
/// In this version every frame, malformed or not, is passed to the kernel (`XDP_PASS`), which
/// makes the final decision about it and counts it in its own statistics.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XdpStats {
    /// Every frame the program ran on.
    pub packets: u64,
    /// Frames whose IPv4 header was complete: version 4, IHL >= 5 and all `IHL * 4` bytes
    /// (options included) inside the frame.
    pub ipv4: u64,
    /// Frames whose 40-byte IPv6 fixed header was complete with version 6. Extension headers are
    /// not walked.
    pub ipv6: u64,
    /// TCP segments whose header was complete (data offset >= 5 and all `offset * 4` bytes inside
    /// the frame): IPv4 that is not a fragment, or IPv6 whose next header is TCP directly.
    pub tcp: u64,
    /// Frames carrying one 802.1Q (0x8100) or 802.1ad (0x88a8) tag, whatever follows it.
    pub vlan: u64,
    /// Complete Ethernet frames whose (inner) EtherType is neither IPv4 nor IPv6 (ARP, LLDP, a
    /// second VLAN tag, ...). Passed to the kernel.
    pub other: u64,
    /// Frames too short for a header they announce: Ethernet < 14 bytes, a truncated VLAN tag, an
    /// IP or TCP header that does not fit, or one with an impossible version / length field.
    /// Counted at the first layer that fails; the outer layers that did parse stay counted.
    /// Passed to the kernel, which drops or handles them.
    pub malformed: u64,
    /// IPv4 fragments (MF set or fragment offset != 0). Their payload is not parsed further: a
    /// first fragment carrying a TCP header is not counted in `tcp`, because fragments are left
    /// to the kernel's reassembly.
    pub ipv4_fragments: u64,
}

impl XdpStats {
    /// Adds `other` into `self` field by field, wrapping like the kernel-side counters do.
    pub fn accumulate(&mut self, other: &XdpStats) {
        self.packets = self.packets.wrapping_add(other.packets);
        self.ipv4 = self.ipv4.wrapping_add(other.ipv4);
        self.ipv6 = self.ipv6.wrapping_add(other.ipv6);
        self.tcp = self.tcp.wrapping_add(other.tcp);
        self.vlan = self.vlan.wrapping_add(other.vlan);
        self.other = self.other.wrapping_add(other.other);
        self.malformed = self.malformed.wrapping_add(other.malformed);
        self.ipv4_fragments = self.ipv4_fragments.wrapping_add(other.ipv4_fragments);
    }
}

// Eight u64 fields and nothing else: no padding, 8-byte alignment on every target.
const _: () = assert!(core::mem::size_of::<XdpStats>() == 8 * 8);
const _: () = assert!(core::mem::align_of::<XdpStats>() == 8);

// SAFETY: `XdpStats` is `#[repr(C)]`, `Copy`, made only of `u64` fields (every bit pattern is
// valid) and has no padding (checked by the size assertion above), so it may be read from and
// written to a map as raw bytes.
#[cfg(feature = "user")]
unsafe impl aya::Pod for XdpStats {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accumulate_adds_every_field() {
        let one = XdpStats {
            packets: 1,
            ipv4: 2,
            ipv6: 3,
            tcp: 4,
            vlan: 5,
            other: 6,
            malformed: 7,
            ipv4_fragments: 8,
        };
        let mut sum = XdpStats::default();
        sum.accumulate(&one);
        sum.accumulate(&one);
        assert_eq!(
            sum,
            XdpStats {
                packets: 2,
                ipv4: 4,
                ipv6: 6,
                tcp: 8,
                vlan: 10,
                other: 12,
                malformed: 14,
                ipv4_fragments: 16,
            },
            "accumulate must add each field to itself"
        );
    }
}
