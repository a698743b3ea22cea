#!/usr/bin/env bash
# The project's test command (README's second command): lints, unit and tiny-model tests in
# debug, then one release build that the default-model and CLI tests share.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== fmt and clippy"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings

echo "== unit and tiny-model tests (debug)"
cargo test --workspace --exclude tandem
# The portable kernels are the reference every SIMD path is checked against: run the model
# tests on them too.
TANDEM_ISA=scalar cargo test -p tandem-engine --test forward --test engine_loop

echo "== release build and the default model"
cargo build --release
./target/release/tandem fetch-model >/dev/null
# The end-to-end tests drive the server with the official OpenAI Python SDK too.
python3 -c "import openai" 2>/dev/null || python3 -m pip install --quiet openai

echo "== default-model and CLI tests (release)"
cargo test --release -p tandem
