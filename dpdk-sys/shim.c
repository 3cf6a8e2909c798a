/* Small accessors for DPDK macros that bindgen cannot express (thread-local rte_errno). */
#include <rte_errno.h>
#include <rte_lcore.h>

int sg_rte_errno(void) { return rte_errno; }
