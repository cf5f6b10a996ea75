//! Everything that touches the kernel: FIB routes under margay's own protocol number, pod plumbing and NAT.
//! It owns only routes with its protocol number and interfaces with its prefix; it never flushes.
