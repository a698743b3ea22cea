//! KV over real QUIC on loopback with mutual TLS from a cluster CA: a transfer arrives byte
//! for byte, and a node whose certificate comes from another CA is refused.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::Pool;
use tandem_kv_transfer::quic::{endpoint, pump};
use tandem_kv_transfer::tls::{Identity, make_ca, make_node_cert};
use tandem_kv_transfer::{Connection, ConnectionConfig, ConnectionEvent, KvDtype, KvLayout, KvSource, encode_kv};

fn layout() -> KvLayout {
    KvLayout { model_id: "tiny".into(), n_layers: 4, n_kv_heads: 2, head_dim: 64, block_size: 16, dtype: KvDtype::F16 }
}

fn identity(ca: &tandem_kv_transfer::tls::PemPair, node: &str) -> Identity {
    let cert = make_node_cert(ca, node, &[]).unwrap();
    Identity::from_pem(&ca.cert, &cert.cert, &cert.key).unwrap()
}

fn config(node: &str) -> ConnectionConfig {
    ConnectionConfig {
        node_id: node.into(),
        layout: layout(),
        max_payload: 1 << 30,
        idle_timeout: Duration::from_secs(5),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_crosses_quic_with_mutual_tls() {
    let ca = make_ca("tandem test CA").unwrap();
    let server = endpoint("127.0.0.1:0".parse().unwrap(), &identity(&ca, "decode-0")).unwrap();
    let addr: SocketAddr = server.local_addr().unwrap();
    let src = [3u32, 9, 4];
    let dst = [0u32, 1, 15];

    let receiver = tokio::spawn(async move {
        let conn = server.accept().await.unwrap().await.unwrap();
        let (mut send, mut recv) = conn.accept_bi().await.unwrap();
        let mut proto = Connection::new(config("decode-0"), Instant::now());
        proto.expect(77, &dst);
        let mut pool = Pool::new(&layout(), 16, |i| (i as u8).wrapping_mul(31).wrapping_add(200));
        let mut events = Vec::new();
        pump(&mut proto, &mut send, &mut recv, &mut pool, |p| {
            while let Some(e) = p.poll_event() {
                events.push(e);
            }
            events.iter().any(|e| matches!(e, ConnectionEvent::Complete { .. }))
        })
        .await
        .unwrap();
        // Keep the connection until the sender has read our side and closes it.
        let _ = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await;
        (events, pool)
    });

    let client = endpoint("127.0.0.1:0".parse().unwrap(), &identity(&ca, "prefill-0")).unwrap();
    let conn = client.connect(addr, "decode-0").unwrap().await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let mut proto = Connection::new(config("prefill-0"), Instant::now());
    let pool = Pool::new(&layout(), 16, |i| (i as u8).wrapping_mul(31).wrapping_add(7));
    let l = layout();
    // Layer by layer, as the prefill node produces them; payload straight from the pool.
    for layer in 0..l.n_layers {
        let (header, payload) = encode_kv(&l, 77, "", layer..layer + 1, &src, &dst, &pool);
        let mut frame = header;
        for p in payload {
            frame.extend_from_slice(p);
        }
        proto.send_frame(Some(77), frame, Instant::now());
    }
    proto.send_done(77, 4242, Instant::now());
    let mut sink = Pool::new(&l, 16, |_| 0);
    pump(&mut proto, &mut send, &mut recv, &mut sink, |p| p.is_open()).await.unwrap();
    send.finish().unwrap();
    let _ = send.stopped().await;
    conn.close(0u32.into(), b"done");
    let (events, received) = tokio::time::timeout(Duration::from_secs(20), receiver).await.unwrap().unwrap();
    assert_eq!(events[0], ConnectionEvent::Open { peer: "prefill-0".into() });
    assert!(events.contains(&ConnectionEvent::Complete { request_id: 77, first_token: 4242 }));
    for layer in 0..l.n_layers {
        for (s, d) in src.iter().zip(&dst) {
            for v in [false, true] {
                assert_eq!(KvSource::half_block(&received, layer, *d, v), KvSource::half_block(&pool, layer, *s, v));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_from_another_ca_is_refused() {
    let ca = make_ca("cluster").unwrap();
    let rogue_ca = make_ca("rogue").unwrap();
    let server = endpoint("127.0.0.1:0".parse().unwrap(), &identity(&ca, "decode-0")).unwrap();
    let addr = server.local_addr().unwrap();
    let accepted = tokio::spawn(async move {
        match server.accept().await {
            Some(incoming) => incoming.await.is_ok(),
            None => false,
        }
    });
    // The rogue node trusts the cluster CA (it knows the public certificate) but its own
    // certificate is signed by another CA: the server must refuse it.
    let rogue_cert = make_node_cert(&rogue_ca, "prefill-x", &[]).unwrap();
    let rogue = Identity::from_pem(&ca.cert, &rogue_cert.cert, &rogue_cert.key).unwrap();
    let client = endpoint("127.0.0.1:0".parse().unwrap(), &rogue).unwrap();
    let outcome = async {
        let conn = client.connect(addr, "decode-0").ok()?.await.ok()?;
        let (mut send, _recv) = conn.open_bi().await.ok()?;
        send.write_all(b"hello").await.ok()?;
        conn.closed().await;
        None::<()>
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), outcome).await;
    let ok = tokio::time::timeout(Duration::from_secs(10), accepted).await.unwrap().unwrap();
    assert!(!ok, "the server accepted a certificate from another CA");
}
