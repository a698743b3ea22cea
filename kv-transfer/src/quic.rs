//! QUIC transport (quinn over rustls, mutual TLS): the async shell that moves a
//! [`Connection`]'s bytes over a QUIC stream.
//!
//! Flow-control windows are sized for bulk transfer, not for request/response traffic: one
//! request's KV is tens of MB for small models and about 1 GiB for an 8K-token prompt of an
//! 8B-class model. A 64 MiB per-stream and 256 MiB per-connection receive window covers the
//! bandwidth-delay product of a 100 Gbit/s link up to ~20 ms RTT, so the sender is limited by
//! the link, not by window updates. A KV frame payload is bounded by
//! [`MAX_KV_FRAME_PAYLOAD`] so a lying peer cannot make the receiver wait on a huge frame.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};

use crate::KvTransferError;
use crate::connection::Connection;
use crate::inbound::KvSink;
use crate::tls::{Identity, TlsError};

/// Largest KV frame payload a QUIC peer may send (one layer of a long prompt's blocks).
pub const MAX_KV_FRAME_PAYLOAD: u64 = 1 << 30;

fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window(quinn::VarInt::from_u32(64 << 20));
    t.receive_window(quinn::VarInt::from_u32(256 << 20));
    t.send_window(256 << 20);
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(64));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(1024));
    t.keep_alive_interval(Some(Duration::from_secs(2)));
    Arc::new(t)
}

/// A QUIC endpoint that accepts cluster peers on `bind` and can connect to others.
pub fn endpoint(bind: SocketAddr, identity: &Identity) -> Result<quinn::Endpoint, TlsError> {
    let server_crypto =
        QuicServerConfig::try_from(identity.server_config()?).map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
    server.transport_config(transport());
    let mut ep = quinn::Endpoint::server(server, bind).map_err(|e| TlsError::Quic(e.to_string()))?;
    ep.set_default_client_config(client_config(identity)?);
    Ok(ep)
}

/// Client settings for connecting to cluster peers.
pub fn client_config(identity: &Identity) -> Result<quinn::ClientConfig, TlsError> {
    let crypto = QuicClientConfig::try_from(identity.client_config()?).map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport());
    Ok(cfg)
}

/// Moves bytes between `proto` and a QUIC stream pair until `done(proto)` holds or the
/// connection closes. KV payload lands in `sink` as it is read, without intermediate buffers
/// beyond quinn's own.
pub async fn pump<S: KvSink>(
    proto: &mut Connection,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    sink: &mut S,
    mut done: impl FnMut(&mut Connection) -> bool,
) -> Result<(), KvTransferError> {
    let io = |e: &dyn std::fmt::Display| KvTransferError::Protocol(format!("QUIC stream: {e}"));
    loop {
        while let Some(bytes) = proto.poll_transmit() {
            send.write_all(&bytes).await.map_err(|e| io(&e))?;
        }
        if done(proto) || proto.is_closed() {
            return Ok(());
        }
        let deadline = proto.poll_timeout().unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        let sleep = tokio::time::sleep_until(deadline.into());
        tokio::select! {
            chunk = recv.read_chunk(1 << 20, true) => match chunk {
                Ok(Some(c)) => proto.handle_bytes(sink, &c.bytes, Instant::now())?,
                Ok(None) => proto.handle_eof(),
                Err(e) => return Err(io(&e)),
            },
            _ = sleep => proto.handle_timeout(Instant::now()),
        }
    }
}
