//! The node-to-node KV-cache wire protocol and its transports (QUIC, shared memory, CUDA IPC).
//!
//! Empty until the kv-transfer issue lands: nothing here pretends to move bytes yet. The
//! block layout it will carry is `tandem_engine::kv`'s.
