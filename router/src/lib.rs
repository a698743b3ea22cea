//! The HTTP gateway: OpenAI-compatible API, authentication, validation, chat templates and
//! tokenization, streaming back to clients.
//!
//! What it is today: the gateway in front of one in-process engine (`tandem serve`, the
//! unified deployment). What it is not yet: the multi-node router (node registry, routing
//! policies, remote prefill); those build on the same [`server`] surface.
//!
//! Known deviation from the crate graph we want: the gateway reaches the tokenizer and chat
//! template through `tandem-engine`, which pulls in the kernels. Splitting text processing
//! into its own crate is planned with the multi-node router.

pub mod api;
pub mod error;
pub mod server;
pub mod validate;

pub use error::ApiError;
pub use server::{ServerConfig, router};
pub use validate::ModelLimits;
