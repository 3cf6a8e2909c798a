//! Raw bytes → `VecFrame` → `Pipeline::prefetch_burst` and `Pipeline::process_hashed` on the port
//! named by the first byte, with a small snapshot (ClusterIP, NodePort, LoadBalancer with a source
//! range, a pod CIDR behind a VTEP) and VXLAN configured. Whatever the bytes, nothing may panic.
//! Every few inputs run `housekeeping` too, and a second pass feeds the output back in (replies of
//! rewritten frames exercise the conntrack hit paths).
#![no_main]

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, OnceLock};

use dataplane::conntrack::ConntrackConfig;
use dataplane::frame::{Frame, VecFrame};
use dataplane::maglev::MaglevTable;
use dataplane::pipeline::{
    Pipeline, PipelineConfig, PortConfig, PortRole, RouteConfig, Verdict, VxlanConfig,
};
use dataplane::snapshot::{
    Backend, BackendSet, EndpointState, Frontend, FrontendKey, FrontendKind, InternalPolicy,
    PodCidrRoute, Protocol, ServicePortName, Snapshot,
};
use dataplane::stats::WorkerStats;
use dataplane::wire::MacAddr;
use libfuzzer_sys::fuzz_target;

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn config() -> PipelineConfig {
    PipelineConfig {
        ports: vec![
            PortConfig {
                id: 0,
                mac: MacAddr([2, 0, 0, 0, 0, 1]),
                addresses: vec!["192.0.2.1/24".parse().unwrap()],
                role: PortRole::Uplink,
                mtu: 1500,
                exception_port: Some(10),
            },
            PortConfig {
                id: 1,
                mac: MacAddr([2, 0, 0, 0, 1, 1]),
                addresses: vec!["10.0.0.1/24".parse().unwrap()],
                role: PortRole::Cluster,
                mtu: 1500,
                exception_port: None,
            },
        ],
        routes: vec![
            RouteConfig {
                prefix: "0.0.0.0/0".parse().unwrap(),
                via: Some(ip("192.0.2.254")),
                port: 0,
            },
            RouteConfig {
                prefix: "10.244.0.0/16".parse().unwrap(),
                via: Some(ip("10.0.0.254")),
                port: 1,
            },
        ],
        static_neighbors: vec![
            (0, ip("192.0.2.254"), MacAddr([2, 0xee, 0, 0, 0, 0xfe])),
            (1, ip("10.0.0.254"), MacAddr([2, 0xee, 0, 0, 1, 0xfe])),
        ],
        vxlan: Some(VxlanConfig {
            udp_port: 4789,
            vni: 1,
            local_vtep: ip("10.0.0.1"),
        }),
        snat_addresses: vec![],
        snat_port_range: 32768..=60999,
        conntrack: ConntrackConfig {
            capacity: 256,
            ..ConntrackConfig::default()
        },
        affinity_capacity: 64,
        icmp_errors_per_second: 1000,
        worker_index: 0,
        workers: 1,
        neighbor_timeout_ms: 30_000,
        routable_prefixes: vec![],
        reassemble_fragments: true,
    }
}

fn set(backends: &[(&str, u16)]) -> Arc<BackendSet> {
    let mut bs: Vec<Backend> = backends
        .iter()
        .map(|(a, p)| Backend {
            addr: ip(a),
            port: *p,
            state: EndpointState::Ready,
            node: Some(Arc::from("node-2")),
        })
        .collect();
    bs.sort_by_key(|b| (b.addr, b.port));
    let pairs: Vec<(Ipv4Addr, u16)> = bs.iter().map(|b| (b.addr, b.port)).collect();
    Arc::new(BackendSet {
        maglev: MaglevTable::build(&pairs, 13),
        usable: (0..bs.len() as u32).collect(),
        backends: bs,
    })
}

fn snapshot() -> Snapshot {
    let mut s = Snapshot {
        generation: 1,
        node_port_addresses: vec![ip("192.0.2.1")],
        service_cidr: Some("10.96.0.0/12".parse().unwrap()),
        pod_routes: vec![PodCidrRoute {
            vtep_mac: None,
            cidr: "10.245.2.0/24".parse().unwrap(),
            vtep: ip("10.0.0.2"),
            vni: 1,
            node: Some(Arc::from("node-2")),
        }],
        ..Snapshot::default()
    };
    let backends = set(&[("10.244.1.5", 8080), ("10.245.2.9", 8080)]);
    let specs: [(FrontendKind, &str, Protocol, u16, bool, Vec<ipnet::Ipv4Net>); 5] = [
        (FrontendKind::ClusterIp, "10.96.0.10", Protocol::Tcp, 80, false, vec![]),
        (FrontendKind::ClusterIp, "10.96.0.10", Protocol::Udp, 53, false, vec![]),
        (FrontendKind::NodePort, "0.0.0.0", Protocol::Tcp, 30080, true, vec![]),
        (
            FrontendKind::LoadBalancer,
            "198.51.100.10",
            Protocol::Tcp,
            443,
            true,
            vec!["203.0.113.0/24".parse().unwrap()],
        ),
        (FrontendKind::LoadBalancer, "198.51.100.10", Protocol::Sctp, 9, false, vec![]),
    ];
    for (id, (kind, addr, protocol, port, masquerade, ranges)) in specs.into_iter().enumerate() {
        let f = Arc::new(Frontend {
            id: id as u32,
            service: ServicePortName {
                namespace: Arc::from("default"),
                name: Arc::from("svc"),
                port_name: Arc::from(""),
                protocol,
            },
            kind,
            addr: ip(addr),
            protocol,
            port,
            backends: backends.clone(),
            masquerade,
            source_ranges: ranges,
            affinity_timeout_secs: (id == 1).then_some(60),
            internal_policy: if id == 0 {
                InternalPolicy::Local {
                    by_node: [(Arc::from("node-2"), backends.clone())].into_iter().collect(),
                }
            } else {
                InternalPolicy::Cluster
            },
        });
        if kind == FrontendKind::NodePort {
            s.node_ports.insert((protocol, port), f);
        } else {
            s.service_addresses.insert(f.addr, kind);
            s.frontends.insert(
                FrontendKey {
                    addr: f.addr,
                    protocol,
                    port,
                },
                f,
            );
        }
        s.frontend_count += 1;
    }
    s
}

struct State {
    pipeline: Pipeline,
    snapshot: Snapshot,
    stats: WorkerStats,
    now: u64,
}

static STATE: OnceLock<Mutex<State>> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let Some((&first, bytes)) = data.split_first() else {
        return;
    };
    let state = STATE.get_or_init(|| {
        Mutex::new(State {
            pipeline: Pipeline::new(config()).unwrap(),
            snapshot: snapshot(),
            stats: WorkerStats::default(),
            now: 0,
        })
    });
    let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
    let st = &mut *st;
    st.now += 7;
    let in_port = [0u16, 1, 10, 5][usize::from(first & 3)];
    let mut frame = VecFrame::new(bytes);
    // As a worker does: the burst prefetch reads the frame first.
    // Its hash goes back with the frame: the fast path's debug assertion checks that it is
    // the key's whenever the fast path uses it.
    let hash = st
        .pipeline
        .prefetch_burst(in_port, std::iter::once(frame.data()))
        .get(0);
    let verdict = st.pipeline.process_hashed(
        &mut frame,
        in_port,
        &st.snapshot,
        st.now,
        &mut st.stats,
        hash,
    );
    if first & 4 != 0 {
        // Feed what came out back in on the port it left through.
        if let Verdict::Transmit { port } | Verdict::HoldForNeighbor { port, .. } = verdict {
            let mut again = VecFrame::new(frame.data());
            st.pipeline
                .process(&mut again, port, &st.snapshot, st.now, &mut st.stats);
        }
    }
    if first & 0xf0 == 0xf0 {
        st.pipeline.housekeeping(st.now, &mut |_, f| assert!(f.len() >= 42));
        let _ = st.pipeline.take_learned().count();
    }
});
