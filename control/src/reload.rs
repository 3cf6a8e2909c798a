//! Config reload (`SIGHUP`): the config file is read and validated again exactly as `check`
//! does it (same one-line errors); a bad one is refused and the running config stays. A good
//! one is applied where that needs no port restart, and the keys that would need one are
//! named and not applied.
//!
//! Applied live: `routes`, `neighbors`, `snat.addresses`, `conntrack.timeouts`,
//! `icmp_errors_per_second`, `edge.routable_prefixes` (the workers take them with the next
//! snapshot, see `dataplane::snapshot::LiveSettings`), `vxlan.pod_cidrs`, `vxlan.nodes`,
//! `maglev.table_size`, `services.*` except `services.source` (the compiler's options; the
//! service source is restarted when its own options changed), `drain_seconds`. Tracked flows
//! survive: translations are stored by value in the conntrack.

use crate::config::Config;

/// The keys of `new` that differ from `old` and need a restart, as key paths
/// (`ports[0].queues`).
pub fn needs_restart(old: &Config, new: &Config) -> Vec<String> {
    let mut keys = Vec::new();
    let mut differ = |key: String, changed: bool| {
        if changed {
            keys.push(key);
        }
    };
    differ("mode".into(), old.mode != new.mode);
    differ("eal.args".into(), old.eal.args != new.eal.args);
    differ(
        "eal.file_prefix".into(),
        old.eal.file_prefix != new.eal.file_prefix,
    );
    differ("eal.no_pci".into(), old.eal.no_pci != new.eal.no_pci);
    differ(
        "cores.control".into(),
        old.cores.control != new.cores.control,
    );
    differ(
        "cores.workers".into(),
        old.cores.workers != new.cores.workers,
    );
    differ(
        "cores.idle_sleep_us".into(),
        old.cores.idle_sleep_us != new.cores.idle_sleep_us,
    );
    differ(
        "mempool.mbufs".into(),
        old.mempool.mbufs != new.mempool.mbufs,
    );
    differ(
        "mempool.cache".into(),
        old.mempool.cache != new.mempool.cache,
    );
    differ("ports".into(), old.ports.len() != new.ports.len());
    for (i, (a, b)) in old.ports.iter().zip(&new.ports).enumerate() {
        differ(format!("ports[{i}].name"), a.name != b.name);
        differ(format!("ports[{i}].device"), a.device != b.device);
        differ(format!("ports[{i}].role"), a.role != b.role);
        differ(format!("ports[{i}].addresses"), a.addresses != b.addresses);
        differ(format!("ports[{i}].queues"), a.queues != b.queues);
        differ(
            format!("ports[{i}].rx_descriptors"),
            a.rx_descriptors != b.rx_descriptors,
        );
        differ(
            format!("ports[{i}].tx_descriptors"),
            a.tx_descriptors != b.tx_descriptors,
        );
        differ(format!("ports[{i}].mtu"), a.mtu != b.mtu);
        differ(
            format!("ports[{i}].promiscuous"),
            a.promiscuous != b.promiscuous,
        );
        differ(format!("ports[{i}].exception"), a.exception != b.exception);
    }
    match (&old.vxlan, &new.vxlan) {
        (Some(a), Some(b)) => {
            differ("vxlan.udp_port".into(), a.udp_port != b.udp_port);
            differ("vxlan.vni".into(), a.vni != b.vni);
            differ("vxlan.local_vtep".into(), a.local_vtep != b.local_vtep);
        }
        (None, None) => {}
        _ => differ("vxlan".into(), true),
    }
    differ(
        "services.source".into(),
        old.services.source != new.services.source,
    );
    differ(
        "snat.port_min".into(),
        old.snat.port_min != new.snat.port_min,
    );
    differ(
        "snat.port_max".into(),
        old.snat.port_max != new.snat.port_max,
    );
    differ(
        "conntrack.capacity".into(),
        old.conntrack.capacity != new.conntrack.capacity,
    );
    differ(
        "conntrack.affinity_capacity".into(),
        old.conntrack.affinity_capacity != new.conntrack.affinity_capacity,
    );
    differ(
        "conntrack.overlap_bursts_from".into(),
        old.conntrack.overlap_bursts_from != new.conntrack.overlap_bursts_from,
    );
    differ(
        "conntrack.half_open_per_source".into(),
        old.conntrack.half_open_per_source != new.conntrack.half_open_per_source,
    );
    differ(
        "conntrack.tcp_loose".into(),
        old.conntrack.tcp_loose != new.conntrack.tcp_loose,
    );
    differ("fragments".into(), old.fragments != new.fragments);
    differ("announce".into(), old.announce != new.announce);
    differ("admin.listen".into(), old.admin.listen != new.admin.listen);
    keys
}

/// What of `new` is applied over the running `old`: every live key of `new`, and the
/// running value of every key that needs a restart. An error (a one-line reason) when the
/// live keys of `new` only make sense with its restart-only ones (a route through a port
/// that does not run yet).
pub fn effective(old: &Config, new: &Config) -> Result<Config, String> {
    let mut out = new.clone();
    out.mode = old.mode;
    out.eal = old.eal.clone();
    out.cores = old.cores.clone();
    out.mempool = old.mempool.clone();
    out.ports = old.ports.clone();
    out.admin = old.admin.clone();
    out.snat.port_min = old.snat.port_min;
    out.snat.port_max = old.snat.port_max;
    out.conntrack.capacity = old.conntrack.capacity;
    out.conntrack.affinity_capacity = old.conntrack.affinity_capacity;
    out.conntrack.overlap_bursts_from = old.conntrack.overlap_bursts_from;
    out.conntrack.half_open_per_source = old.conntrack.half_open_per_source;
    out.conntrack.tcp_loose = old.conntrack.tcp_loose;
    out.fragments = old.fragments.clone();
    out.announce = old.announce.clone();
    match (&old.vxlan, &mut out.vxlan) {
        (Some(a), Some(b)) => {
            b.udp_port = a.udp_port;
            b.vni = a.vni;
            b.local_vtep = a.local_vtep;
        }
        (None, None) => {}
        (a, b) => *b = a.clone(),
    }
    if old.services.source != new.services.source {
        out.services = old.services.clone();
    }
    for (i, route) in out.routes.iter().enumerate() {
        if out.port_index(&route.port).is_none() {
            return Err(format!(
                "routes[{i}].port: {:?} is not a running port (new ports need a restart)",
                route.port
            ));
        }
    }
    for (i, neighbor) in out.neighbors.iter().enumerate() {
        if out.port_index(&neighbor.port).is_none() {
            return Err(format!(
                "neighbors[{i}].port: {:?} is not a running port (new ports need a restart)",
                neighbor.port
            ));
        }
    }
    Ok(out)
}

/// Whether the service source must be restarted to take `new`'s options.
pub fn source_changed(old: &Config, new: &Config) -> bool {
    let (a, b) = (&old.services, &new.services);
    a.path != b.path
        || a.kubeconfig != b.kubeconfig
        || a.label_selector != b.label_selector
        || a.namespace != b.namespace
        || a.poll_ms != b.poll_ms
        || old.node_scheme() != new.node_scheme()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str, queues: u16) -> Config {
        Config::parse(
            &format!(
                "ports:\n  - {{name: up, device: net_null0, role: uplink, addresses: [192.168.1.1/24], queues: {queues}}}\n  \
                 - {{name: cl, device: net_null1, role: cluster, addresses: [10.0.0.1/24]}}\n\
                 services: {{source: files, path: /}}\n{extra}"
            ),
            "gateway.yaml",
        )
        .expect("valid")
    }

    #[test]
    fn restart_keys_are_named_and_kept_and_the_rest_applies() {
        let old = config("", 1);
        let new = config(
            "routes: [{prefix: 203.0.113.0/24, via: 192.168.1.2, port: up}]\n\
             icmp_errors_per_second: 10\nconntrack: {capacity: 1000, timeouts: {udp: 5}}\n",
            2,
        );
        assert_eq!(
            needs_restart(&old, &new),
            ["ports[0].queues", "conntrack.capacity"]
        );
        let applied = effective(&old, &new).expect("applies");
        assert_eq!(applied.ports[0].queues, 1, "kept");
        assert_eq!(applied.conntrack.capacity, old.conntrack.capacity, "kept");
        assert_eq!(applied.routes.len(), 1, "applied");
        assert_eq!(applied.icmp_errors_per_second, 10);
        assert_eq!(applied.conntrack.timeouts.udp, Some(5));
        assert!(needs_restart(&old, &applied).is_empty());
        assert!(!source_changed(&old, &applied));
    }

    #[test]
    fn a_route_through_a_port_that_needs_a_restart_is_refused() {
        let old = config("", 1);
        let mut new = config("", 1);
        new.ports[1].name = "cluster".into();
        new.routes = config(
            "routes: [{prefix: 203.0.113.0/24, via: 10.0.0.2, port: cl}]\n",
            1,
        )
        .routes;
        new.routes[0].port = "cluster".into();
        let err = effective(&old, &new).unwrap_err();
        assert!(err.starts_with("routes[0].port: \"cluster\""), "{err}");
    }
}
