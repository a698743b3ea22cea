//! The decode service: admission, paged KV pool, continuous batching, token streaming.
//!
//! Empty until the end-to-end serving issue lands.
