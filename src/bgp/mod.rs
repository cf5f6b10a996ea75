//! The embedded BGP speaker. `wire` is the pure codec; sessions, RIB and policy are built on it.

pub mod policy;
pub mod rib;
pub mod session;
pub mod speaker;
pub mod wire;
