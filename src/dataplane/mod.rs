//! Everything that touches the kernel: FIB routes under margay's own protocol number, pod plumbing, the
//! tunnel devices (VXLAN, IPIP) and NAT.
//! It owns only routes with its protocol number and interfaces with its prefix; it never flushes.
//!
//! All netlink work for a node runs in that node's network namespace (sockets are opened by a thread that
//! entered it, see [`netns`]), so a lab can run many nodes on one machine.

pub mod autodetect;
pub mod encap;
pub mod error;
pub mod fib;
pub mod hostveth;
pub mod ipip;
pub mod mtu;
pub mod nat;
pub mod netns;
pub(crate) mod nl;
pub mod pod;
pub mod resolve;
pub mod sysctl;
pub mod vxlan;

pub use error::{DataplaneError, NlError};
pub use fib::{Dev, Fib, FibConfig, FibHandle, FibStatus, NextHop, NextHops, Route};
pub use netns::{in_netns, NetnsPath};
pub use pod::{
    add_pod, check_pod, del_pod, host_ifname, list_pods, PlumbedPod, PodResult, PodSpec,
};
