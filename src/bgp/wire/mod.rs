//! BGP wire codec: pure functions over bytes. No I/O, no tokio, no globals; what a session negotiated
//! (4-octet AS, ADD-PATH, extended messages) travels in the decode/encode context.

pub mod types;

pub use types::*;
