//! Binds the system libdpdk found through pkg-config and compiles C wrappers for the
//! `static inline` functions the dataplane calls (rx/tx burst, mbuf helpers, rte_errno…).

use std::env;
use std::path::PathBuf;

const MISSING: &str = "libdpdk not found by pkg-config: install it with `apt-get install -y dpdk dpdk-dev libdpdk-dev pkg-config clang libclang-dev`";

fn main() {
    println!("cargo:rerun-if-changed=wrapper.h");
    println!("cargo:rerun-if-changed=shim.c");
    let dpdk = match pkg_config::Config::new()
        .atleast_version("22.11")
        .probe("libdpdk")
    {
        Ok(lib) => lib,
        Err(err) => {
            eprintln!("{MISSING}\n({err})");
            panic!("{MISSING}");
        }
    };

    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let wrappers = out.join("static_fns.c");

    let mut builder = bindgen::Builder::default()
        .header("wrapper.h")
        .wrap_static_fns(true)
        .wrap_static_fns_path(out.join("static_fns"))
        .allowlist_function("rte_eal_.*")
        .allowlist_function("rte_errno.*")
        .allowlist_function("rte_strerror")
        .allowlist_function("per_lcore__rte_errno")
        .allowlist_function("rte_lcore_.*")
        .allowlist_function("rte_get_.*")
        .allowlist_function("rte_socket_id")
        .allowlist_function("rte_rdtsc.*")
        .allowlist_function("rte_delay_us_block")
        .allowlist_function("rte_pktmbuf_.*")
        .allowlist_function("rte_mbuf_.*")
        .allowlist_function("rte_mempool_.*")
        .allowlist_function("rte_eth_.*")
        .allowlist_function("rte_vdev_.*")
        .allowlist_function("rte_ring_.*")
        .allowlist_function("rte_prefetch.*")
        .allowlist_function("rte_version")
        .allowlist_function("sg_.*")
        .allowlist_function("rte_lpm_.*")
        .allowlist_function("rte_telemetry_register_cmd")
        .allowlist_function("rte_tel_data_.*")
        .allowlist_function("rte_ip_frag_.*")
        .allowlist_function("rte_ipv4_frag_reassemble_packet")
        .allowlist_function("rte_ipv4_fragment_copy_nonseg_packet")
        .allowlist_function("rte_pdump_.*")
        .allowlist_function("rte_pcapng_.*")
        .allowlist_function("rte_bpf_convert")
        .allowlist_function("rte_free")
        .allowlist_function("pcap_open_dead")
        .allowlist_function("pcap_compile")
        .allowlist_function("pcap_freecode")
        .allowlist_function("pcap_geterr")
        .allowlist_function("pcap_close")
        .allowlist_var("RTE_PDUMP_.*")
        .allowlist_var("DLT_EN10MB")
        .allowlist_var("PCAP_NETMASK_UNKNOWN")
        .allowlist_var("RING_F_.*")
        .allowlist_var("RTE_.*")
        .allowlist_type("rte_eth_.*")
        .allowlist_type("rte_mbuf")
        .allowlist_type("rte_mempool")
        .allowlist_type("rte_lpm.*")
        .allowlist_type("rte_tel_.*")
        .allowlist_type("rte_ip_frag_.*")
        .blocklist_type("rte_l2tpv2_combined_msg_hdr")
        .blocklist_type("rte_arp_hdr")
        .blocklist_function("rte_lpm_lookupx4")
        .derive_default(true)
        .layout_tests(false)
        .generate_comments(false)
        .clang_arg("-march=native")
        .clang_arg("-Wno-everything")
        // rte_ip_frag's copy fragmentation and expiry sweep are marked experimental in 22.11.
        .clang_arg("-DALLOW_EXPERIMENTAL_API")
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()));
    for path in &dpdk.include_paths {
        builder = builder.clang_arg(format!("-I{}", path.display()));
    }
    let bindings = builder
        .generate()
        .expect("bindgen could not process the DPDK headers");
    bindings
        .write_to_file(out.join("bindings.rs"))
        .expect("write bindings.rs");

    let mut cc = cc::Build::new();
    cc.file(&wrappers)
        .file("shim.c")
        .include(env::current_dir().expect("cwd"))
        .flag("-march=native")
        .flag("-O3")
        .define("ALLOW_EXPERIMENTAL_API", None)
        .flag("-Wno-deprecated-declarations")
        .warnings(false);
    for path in &dpdk.include_paths {
        cc.include(path);
    }
    cc.compile("dpdk_static_fns");

    // pkg-config already emitted the link lines for libdpdk; PMDs load as plugins at EAL init.
    // libpcap compiles capture filters (`servicegate ctl capture --filter`) for rte_bpf.
    println!("cargo:rustc-link-lib=pcap");
}
