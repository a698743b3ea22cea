//! The prefill service: batched, chunked prompt processing that streams KV to decode nodes.
//!
//! Empty until the end-to-end serving issue lands.
