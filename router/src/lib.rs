//! The HTTP gateway: OpenAI-compatible API, validation, tokenization and routing.
//!
//! Empty until the end-to-end serving issue lands; `tandem generate` is the way to run the
//! model today.
