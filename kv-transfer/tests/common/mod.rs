//! The tests' pool is the crate's in-memory one.
#![allow(unused_imports)]

pub use tandem_kv_transfer::mem::MemPool as Pool;
