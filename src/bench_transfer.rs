//! `tandem bench-transfer`: moving one request's KV between two pools in one process, side by
//! side: a plain memcpy of the same bytes, raw TCP over loopback, and tandem's KV protocol over
//! QUIC with mutual TLS (layer-by-layer frames, payload written from the sender's pool and
//! decoded straight into the receiver's blocks).
//!
//! For each model shape and prompt length it reports GB/s (median), per-transfer latency p50 /
//! p99, CPU seconds per GB moved (both ends together, from getrusage), and how many times each
//! byte is copied on its way.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tandem_kv_transfer::mem::MemPool;
use tandem_kv_transfer::quic::{endpoint, pump};
use tandem_kv_transfer::tls::{Identity, make_ca, make_node_cert};
use tandem_kv_transfer::{Connection, ConnectionConfig, ConnectionEvent, KvDtype, KvLayout, encode_kv};

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let u = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u
    };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 * 1e-6;
    t(u.ru_utime) + t(u.ru_stime)
}

struct Sample {
    seconds: Vec<f64>,
    cpu: f64,
    bytes: u64,
}

fn report(name: &str, copies: &str, s: &Sample) -> String {
    let mut t = s.seconds.clone();
    t.sort_by(f64::total_cmp);
    let p = |q: f64| t[((q * t.len() as f64).ceil() as usize).clamp(1, t.len()) - 1];
    let gbps = s.bytes as f64 / p(0.5) / 1e9;
    let cpu_per_gb = s.cpu / (s.bytes as f64 * t.len() as f64 / 1e9);
    format!("| {name} | {gbps:.2} | {:.2} | {:.2} | {cpu_per_gb:.3} | {copies} |", p(0.5) * 1e3, p(0.99) * 1e3)
}

fn memcpy(layout: &KvLayout, blocks: usize, runs: usize) -> Sample {
    let src = MemPool::new(layout, blocks, |_| 1);
    let mut dst = MemPool::new(layout, blocks, |_| 0);
    // Warm-up: fault the destination's pages in, as a long-lived pool's are.
    dst.bytes.copy_from_slice(&src.bytes);
    let cpu0 = cpu_seconds();
    let seconds = (0..runs)
        .map(|_| {
            let t = Instant::now();
            dst.bytes.copy_from_slice(&src.bytes);
            std::hint::black_box(&dst.bytes);
            t.elapsed().as_secs_f64()
        })
        .collect();
    Sample { seconds, cpu: cpu_seconds() - cpu0, bytes: src.bytes.len() as u64 }
}

fn tcp(layout: &KvLayout, blocks: usize, runs: usize) -> Result<Sample> {
    let src = MemPool::new(layout, blocks, |_| 1);
    let total = src.bytes.len();
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let receiver = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        let mut dst = vec![0u8; total];
        for _ in 0..runs + 1 {
            s.read_exact(&mut dst)?;
            s.write_all(&[1])?;
        }
        Ok(())
    });
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let mut seconds = Vec::new();
    let mut cpu0 = 0.0;
    // The first transfer warms up buffers and pages and is not counted.
    for i in 0..runs + 1 {
        if i == 1 {
            cpu0 = cpu_seconds();
        }
        let t = Instant::now();
        s.write_all(&src.bytes)?;
        let mut ack = [0u8];
        s.read_exact(&mut ack)?;
        if i > 0 {
            seconds.push(t.elapsed().as_secs_f64());
        }
    }
    let cpu = cpu_seconds() - cpu0;
    receiver.join().map_err(|_| anyhow::anyhow!("TCP receiver panicked"))??;
    Ok(Sample { seconds, cpu, bytes: total as u64 })
}

async fn quic(layout: &KvLayout, blocks: usize, runs: usize) -> Result<Sample> {
    let ca = make_ca("bench CA")?;
    let id = |n: &str| -> Result<Identity> {
        let c = make_node_cert(&ca, n, &[])?;
        Ok(Identity::from_pem(&ca.cert, &c.cert, &c.key)?)
    };
    let server = endpoint("127.0.0.1:0".parse()?, &id("decode")?)?;
    let addr = server.local_addr()?;
    let cfg = |n: &str| ConnectionConfig {
        node_id: n.into(),
        layout: layout.clone(),
        max_payload: 1 << 31,
        // Long enough that no heartbeat lands between a transfer and its one-byte ack.
        idle_timeout: Duration::from_secs(3600),
    };
    let ids: Vec<u32> = (0..blocks as u32).collect();
    let rl = layout.clone();
    let rcfg = cfg("decode");
    let rids = ids.clone();
    let receiver = tokio::spawn(async move {
        let conn = server.accept().await.context("no connection")?.await?;
        let (mut send, mut recv) = conn.accept_bi().await?;
        let mut proto = Connection::new(rcfg, Instant::now());
        let mut pool = MemPool::new(&rl, blocks, |_| 0);
        for r in 0..=runs as u64 {
            proto.expect(r, &rids);
            let mut complete = false;
            pump(&mut proto, &mut send, &mut recv, &mut pool, |p| {
                while let Some(e) = p.poll_event() {
                    complete |= matches!(e, ConnectionEvent::Complete { .. });
                }
                complete
            })
            .await?;
            send.write_all(&[1]).await?;
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
        anyhow::Ok(())
    });
    let client = endpoint("127.0.0.1:0".parse()?, &id("prefill")?)?;
    let conn = client.connect(addr, "decode")?.await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let mut proto = Connection::new(cfg("prefill"), Instant::now());
    let src = MemPool::new(layout, blocks, |_| 1);
    let mut sink = MemPool::new(layout, 1, |_| 0);
    pump(&mut proto, &mut send, &mut recv, &mut sink, |p| p.is_open()).await?;
    let mut cpu0 = 0.0;
    let mut seconds = Vec::new();
    // Transfer 0 warms up (congestion window, pages) and is not counted.
    for r in 0..=runs as u64 {
        if r == 1 {
            cpu0 = cpu_seconds();
        }
        let t = Instant::now();
        for layer in 0..layout.n_layers {
            let (header, payload) = encode_kv(layout, r, "", layer..layer + 1, &ids, &ids, &src);
            send.write_all(&header).await?;
            for p in payload {
                send.write_all(p).await?;
            }
        }
        proto.send_done(r, 0, Instant::now());
        while let Some(b) = proto.poll_transmit() {
            send.write_all(&b).await?;
        }
        // The receiver acknowledges with one byte once every block-layer landed.
        let mut ack = [0u8; 1];
        recv.read_exact(&mut ack).await?;
        if r > 0 {
            seconds.push(t.elapsed().as_secs_f64());
        }
    }
    let cpu = cpu_seconds() - cpu0;
    send.finish()?;
    conn.close(0u32.into(), b"done");
    receiver.await??;
    Ok(Sample { seconds, cpu, bytes: src.bytes.len() as u64 })
}

/// Runs every shape and size, printing a Markdown table.
pub fn run(runs: usize, sizes: &[usize]) -> Result<()> {
    let shapes = [
        (
            "SmolLM2-135M (30 layers, 3 KV heads, dim 64, f16)",
            KvLayout {
                model_id: "smollm2-135m".into(),
                n_layers: 30,
                n_kv_heads: 3,
                head_dim: 64,
                block_size: 16,
                dtype: KvDtype::F16,
            },
        ),
        (
            "8B-class (32 layers, 8 KV heads, dim 128, f16)",
            KvLayout {
                model_id: "8b".into(),
                n_layers: 32,
                n_kv_heads: 8,
                head_dim: 128,
                block_size: 16,
                dtype: KvDtype::F16,
            },
        ),
    ];
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    println!("# tandem bench-transfer\n\nOne process, both ends on this machine; {runs} transfers per cell.\n");
    for (name, layout) in &shapes {
        println!("## {name}\n");
        println!("| transfer | GB/s (p50) | p50 ms | p99 ms | CPU s per GB | copies per byte |");
        println!("| --- | ---: | ---: | ---: | ---: | --- |");
        for &tokens in sizes {
            let blocks = tokens.div_ceil(layout.block_size as usize);
            let mb = layout.n_layers as f64 * blocks as f64 * layout.block_layer_bytes() as f64 / 1e6;
            println!("| **{tokens}-token prompt, {mb:.1} MB** | | | | | |");
            println!("{}", report("memcpy", "1", &memcpy(layout, blocks, runs)));
            println!("{}", report("raw TCP, loopback", "2 (into and out of the kernel)", &tcp(layout, blocks, runs)?));
            let q = rt.block_on(quic(layout, blocks, runs))?;
            println!(
                "{}",
                report("tandem KV over QUIC (mutual TLS)", "≥4 (encrypt, kernel ×2, decrypt into the pool)", &q)
            );
        }
        println!();
    }
    Ok(())
}
