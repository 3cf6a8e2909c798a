//! Micro-benchmarks of the packet path's building blocks: `cargo bench -p dataplane`.
//! (The end-to-end figures come from `cargo run --release -p perf`.)

use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use dataplane::conntrack::{Conntrack, ConntrackConfig, FlowKey, Nat, SnapshotBinding};
use dataplane::maglev::MaglevTable;
use dataplane::wire::build::FrameBuilder;
use dataplane::wire::{checksum, EthernetFrame, Ipv4Packet, MacAddr, TcpFlags, TcpPacket};

const TCP: u8 = 6;

fn frame64() -> Vec<u8> {
    FrameBuilder::new(
        MacAddr([2, 0, 0, 0, 1, 2]),
        MacAddr([2, 0x70, 0x63, 0x61, 0x70, 0]),
    )
    .pad(true)
    .tcp_v4(
        SocketAddrV4::new(Ipv4Addr::new(192, 168, 100, 10), 40000),
        SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80),
        TcpFlags::ACK,
        b"",
    )
}

fn parse(c: &mut Criterion) {
    let frame = frame64();
    c.bench_function("parse/eth+ipv4+tcp new_checked (64B)", |b| {
        b.iter(|| {
            let eth = EthernetFrame::new_checked(black_box(&frame[..])).expect("eth");
            let ip = Ipv4Packet::new_checked(eth.payload()).expect("ipv4");
            let tcp = TcpPacket::new_checked(ip.payload()).expect("tcp");
            black_box((ip.dst(), tcp.dst_port()))
        })
    });
}

fn key(i: u32) -> FlowKey {
    FlowKey::new(
        TCP,
        Ipv4Addr::from(0xc0a8_6400 + (i >> 16)),
        (i & 0xffff) as u16,
        Ipv4Addr::new(10, 96, 0, 10),
        80,
    )
}

fn entry(i: u32) -> (FlowKey, FlowKey, Nat) {
    let k = key(i);
    let backend = (Ipv4Addr::new(10, 244, 1, 2), 9376);
    let reply = FlowKey::new(TCP, backend.0, backend.1, k.src, k.src_port);
    let nat = Nat {
        frontend_addr: k.dst,
        frontend_port: k.dst_port,
        backend_addr: backend.0,
        backend_port: backend.1,
        snat: None,
    };
    (k, reply, nat)
}

fn conntrack(c: &mut Criterion) {
    const N: u32 = 100_000;
    let mut ct = Conntrack::new(ConntrackConfig {
        capacity: 262_144,
        ..ConntrackConfig::default()
    });
    for i in 0..N {
        let (k, r, nat) = entry(i);
        ct.insert(k, r, nat, SnapshotBinding::new(1, 0), 0)
            .expect("insert");
    }
    let mut g = c.benchmark_group("conntrack (100k entries)");
    let mut i = 0u32;
    g.bench_function("lookup hit", |b| {
        b.iter(|| {
            i = (i + 7919) % N;
            black_box(ct.lookup(&key(i), 1))
        })
    });
    g.bench_function("lookup miss", |b| {
        b.iter(|| {
            i = (i + 7919) % N;
            black_box(ct.lookup(&key(N + i), 1))
        })
    });
    g.bench_function("insert+remove", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            let (k, r, nat) = entry(N + (i % 1_000_000));
            let id = ct
                .insert(k, r, nat, SnapshotBinding::new(1, 0), 1)
                .expect("insert");
            ct.remove(black_box(id))
        })
    });
    g.finish();
}

fn maglev(c: &mut Criterion) {
    let mut g = c.benchmark_group("maglev build");
    g.sample_size(10);
    for size in [16381u32, 65537] {
        for n in [10u32, 100, 1000] {
            let backends: Vec<(Ipv4Addr, u16)> = (0..n)
                .map(|j| (Ipv4Addr::from(0x0af4_0000 + j), 9376))
                .collect();
            g.bench_with_input(
                BenchmarkId::new(format!("M={size}"), n),
                &backends,
                |b, backends| b.iter(|| black_box(MaglevTable::build(backends, size))),
            );
        }
    }
    g.finish();
}

fn checksum_update(c: &mut Criterion) {
    let mut sum = 0x1c46u16;
    let mut addr = 0x0a60_000au32;
    c.bench_function("checksum update_u32", |b| {
        b.iter(|| {
            let new = addr.wrapping_add(0x0101);
            sum = checksum::update_u32(black_box(sum), addr, new);
            addr = new;
            sum
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    targets = parse, conntrack, maglev, checksum_update
}
criterion_main!(benches);
