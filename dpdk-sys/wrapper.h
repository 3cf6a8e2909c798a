/* The DPDK surface servicegate uses. Only what the allowlist in build.rs names is bound. */
#include <rte_config.h>
#include <rte_eal.h>
#include <rte_errno.h>
#include <rte_lcore.h>
#include <rte_launch.h>
#include <rte_cycles.h>
#include <rte_mempool.h>
#include <rte_mbuf.h>
#include <rte_ethdev.h>
#include <rte_bus_vdev.h>
#include <rte_ring.h>
#include <rte_prefetch.h>
#include <rte_version.h>
#include <rte_lpm.h>
#include <rte_telemetry.h>
#include <rte_ip_frag.h>
#include <pcap/pcap.h>
#include <rte_pdump.h>
#include <rte_pcapng.h>
#include <rte_bpf.h>

/* shim.c */
int sg_rte_errno(void);
