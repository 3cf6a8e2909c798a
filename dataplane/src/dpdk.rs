//! The safe DPDK layer: EAL, mempools, ports and queues, mbufs with a single owner, bursts.
//! The only module of servicegate (besides `dpdk-sys`) that contains `unsafe`; every block
//! says why it is sound. Negative returns and `rte_errno` become `Result` in `check`.
#![allow(unsafe_code)]

use std::ffi::{c_int, c_uint, c_void, CStr, CString};
use std::fmt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};

use dpdk_sys as sys;

use crate::frame::Frame;

/// Frames per `rx_burst` call, as testpmd and VPP use.
pub const BURST_SIZE: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub operation: String,
    pub code: i32,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.operation, strerror(self.code))
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// DPDK's description of an error code (its own codes and errno values).
pub fn strerror(code: i32) -> String {
    // SAFETY: rte_strerror returns a pointer to a static or thread-local NUL-terminated
    // string for any code; we copy it out before the next call could overwrite it.
    unsafe {
        let message = sys::rte_strerror(code);
        if message.is_null() {
            return format!("error {code}");
        }
        CStr::from_ptr(message).to_string_lossy().into_owned()
    }
}

fn rte_errno() -> i32 {
    // SAFETY: reads the calling thread's rte_errno through a C accessor; no preconditions.
    unsafe { sys::sg_rte_errno() }
}

/// Turns a DPDK return value into a `Result`: negative values are `-errno` codes; `-1`
/// means "see rte_errno" for the EAL calls that use that convention.
fn check(operation: impl Into<String>, ret: c_int) -> Result<c_int> {
    if ret >= 0 {
        return Ok(ret);
    }
    let code = if ret == -1 { rte_errno() } else { -ret };
    Err(Error {
        operation: operation.into(),
        code,
    })
}

/// DPDK's version string, e.g. "DPDK 22.11.11".
pub fn version() -> String {
    // SAFETY: rte_version returns a pointer to a static NUL-terminated string.
    unsafe { CStr::from_ptr(sys::rte_version()) }
        .to_string_lossy()
        .into_owned()
}

/// Time-stamp counter and its frequency: the clock of the per-burst latency histogram.
/// Inlined on x86_64 (DPDK's `rte_rdtsc` is a static inline that reaches Rust only as an
/// out-of-line wrapper call, and the worker reads the clock twice per burst).
#[inline(always)]
pub fn tsc() -> u64 {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: rdtsc has no preconditions and only reads the time-stamp counter.
    unsafe {
        std::arch::x86_64::_rdtsc()
    }
    #[cfg(not(target_arch = "x86_64"))]
    // SAFETY: rdtsc has no preconditions.
    unsafe {
        sys::rte_rdtsc()
    }
}

pub fn tsc_hz() -> u64 {
    // SAFETY: valid after EAL init; before it DPDK returns 0, which callers treat as unknown.
    unsafe { sys::rte_get_tsc_hz() }
}

/// An EAL logical core id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LcoreId(pub u32);

/// The calling thread's lcore id (`u32::MAX` on a thread EAL does not know).
pub fn current_lcore() -> LcoreId {
    // SAFETY: rte_lcore_id reads a thread-local; no preconditions.
    LcoreId(unsafe { sys::rte_lcore_id() })
}

static EAL_STARTED: AtomicBool = AtomicBool::new(false);

/// The initialised Environment Abstraction Layer. One per process: DPDK cannot be
/// initialised twice, even after cleanup. Dropping it runs `rte_eal_cleanup`, which must
/// happen after every port is closed and every mempool freed.
pub struct Eal {
    _private: (),
}

impl Eal {
    /// Initialises EAL with `args` (without the program name). Fails if EAL was already
    /// initialised in this process.
    pub fn init<S: AsRef<str>>(args: &[S]) -> Result<Eal> {
        if EAL_STARTED.swap(true, Ordering::SeqCst) {
            return Err(Error {
                operation: "rte_eal_init (EAL initialises once per process)".into(),
                code: libc_eal_already(),
            });
        }
        let mut owned: Vec<CString> = Vec::with_capacity(args.len() + 1);
        owned.push(CString::new("servicegate").expect("no NUL"));
        for arg in args {
            owned.push(CString::new(arg.as_ref()).map_err(|_| Error {
                operation: format!("EAL argument {:?} contains a NUL byte", arg.as_ref()),
                code: 22,
            })?);
        }
        let mut argv: Vec<*mut std::ffi::c_char> =
            owned.iter().map(|s| s.as_ptr() as *mut _).collect();
        // SAFETY: argv holds argc valid NUL-terminated strings that outlive the call (EAL
        // may permute the pointer array, which we own, and keeps no pointer past return
        // except into `owned`, which we leak below for that reason).
        let ret = unsafe { sys::rte_eal_init(argv.len() as c_int, argv.as_mut_ptr()) };
        std::mem::forget(owned);
        check("rte_eal_init", ret)?;
        Ok(Eal { _private: () })
    }

    /// Runs `work` on the EAL worker lcore `lcore`. Join it with `wait`.
    pub fn launch(&self, lcore: LcoreId, work: Box<dyn FnOnce() + Send + 'static>) -> Result<()> {
        extern "C" fn trampoline(arg: *mut c_void) -> c_int {
            // SAFETY: `arg` is the pointer produced by Box::into_raw below, passed to exactly
            // one launch, so we are its only owner.
            let work: Box<Box<dyn FnOnce() + Send>> = unsafe { Box::from_raw(arg.cast()) };
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)) {
                Ok(()) => 0,
                Err(_) => -1,
            }
        }
        let arg = Box::into_raw(Box::new(work)).cast::<c_void>();
        // SAFETY: the trampoline has the signature lcore_function_t expects and takes
        // ownership of `arg`; on failure EAL did not run it, so we reclaim the box.
        let ret = unsafe { sys::rte_eal_remote_launch(Some(trampoline), arg, lcore.0 as c_uint) };
        if ret < 0 {
            // SAFETY: the launch failed, so the trampoline never received `arg`.
            drop(unsafe { Box::from_raw(arg.cast::<Box<dyn FnOnce() + Send>>()) });
        }
        check(format!("rte_eal_remote_launch on lcore {}", lcore.0), ret).map(|_| ())
    }

    /// Waits for the work launched on `lcore`; false when it panicked.
    pub fn wait(&self, lcore: LcoreId) -> bool {
        // SAFETY: waiting on a launched (or idle) worker lcore has no other precondition.
        unsafe { sys::rte_eal_wait_lcore(lcore.0 as c_uint) == 0 }
    }

    /// The enabled worker lcores (every lcore but the main one), in order.
    pub fn worker_lcores(&self) -> Vec<LcoreId> {
        let mut lcores = Vec::new();
        // SAFETY: rte_get_next_lcore iterates EAL's lcore table; RTE_MAX_LCORE ends it.
        let mut lcore = unsafe { sys::rte_get_next_lcore(u32::MAX, 1, 0) };
        while lcore < sys::RTE_MAX_LCORE {
            lcores.push(LcoreId(lcore));
            // SAFETY: as above.
            lcore = unsafe { sys::rte_get_next_lcore(lcore, 1, 0) };
        }
        lcores
    }
}

impl Drop for Eal {
    fn drop(&mut self) {
        // SAFETY: called once, after the owner closed ports and freed pools (Drop order of
        // `Runtime`); EAL's worker lcores are idle because every launch was waited for.
        unsafe { sys::rte_eal_cleanup() };
    }
}

fn libc_eal_already() -> i32 {
    114 // EALREADY
}

/// A pool of packet buffers (`rte_pktmbuf_pool_create`).
pub struct Mempool {
    pool: NonNull<sys::rte_mempool>,
}

// SAFETY: a DPDK mempool is safe to use from several threads (its ring is multi-producer,
// multi-consumer; per-lcore caches are keyed by the calling lcore).
unsafe impl Send for Mempool {}
// SAFETY: as above; every method takes &self and DPDK synchronises internally.
unsafe impl Sync for Mempool {}

impl Mempool {
    /// `size` mbufs of `data_room` bytes (plus DPDK's headroom) with a per-lcore cache.
    pub fn new(_eal: &Eal, name: &str, size: u32, cache: u32, data_room: u16) -> Result<Mempool> {
        let cname = CString::new(name).map_err(|_| Error {
            operation: format!("mempool name {name:?}"),
            code: 22,
        })?;
        // SAFETY: EAL is initialised (we hold &Eal); the name is a valid C string copied by
        // DPDK; SOCKET_ID_ANY lets DPDK choose the NUMA node.
        let pool = unsafe {
            sys::rte_pktmbuf_pool_create(
                cname.as_ptr(),
                size,
                cache,
                0,
                data_room.saturating_add(sys::RTE_PKTMBUF_HEADROOM as u16),
                -1,
            )
        };
        NonNull::new(pool)
            .map(|pool| Mempool { pool })
            .ok_or(Error {
                operation: format!("rte_pktmbuf_pool_create({name}, {size} mbufs)"),
                code: rte_errno(),
            })
    }

    /// Mbufs currently taken from the pool (0 after a clean stop).
    pub fn in_use(&self) -> u32 {
        // SAFETY: the pool is valid for the life of self.
        unsafe { sys::rte_mempool_in_use_count(self.pool.as_ptr()) }
    }

    pub fn available(&self) -> u32 {
        // SAFETY: the pool is valid for the life of self.
        unsafe { sys::rte_mempool_avail_count(self.pool.as_ptr()) }
    }

    /// A fresh mbuf, or `None` when the pool is empty.
    pub fn alloc(&self) -> Option<Mbuf> {
        // SAFETY: the pool is valid; a non-null result is an mbuf we now own.
        NonNull::new(unsafe { sys::rte_pktmbuf_alloc(self.pool.as_ptr()) })
            .map(|mbuf| Mbuf { mbuf })
    }

    fn as_ptr(&self) -> *mut sys::rte_mempool {
        self.pool.as_ptr()
    }
}

impl Drop for Mempool {
    fn drop(&mut self) {
        // SAFETY: the owner drops pools after ports are closed, so no PMD still holds mbufs
        // of this pool; the pointer came from rte_pktmbuf_pool_create.
        unsafe { sys::rte_mempool_free(self.pool.as_ptr()) };
    }
}

/// A packet buffer with exactly one owner: dropping it frees it, transmitting consumes it.
/// Only single-segment mbufs are handed to the pipeline (ports run without scatter).
pub struct Mbuf {
    mbuf: NonNull<sys::rte_mbuf>,
}

// SAFETY: an mbuf is owned by exactly one Mbuf value; moving it to another thread moves
// that ownership (the hand-off ring between workers relies on this).
unsafe impl Send for Mbuf {}

impl Mbuf {
    fn raw(&self) -> &sys::rte_mbuf {
        // SAFETY: we own a valid mbuf for the life of self.
        unsafe { self.mbuf.as_ref() }
    }

    fn raw_mut(&mut self) -> &mut sys::rte_mbuf {
        // SAFETY: we own a valid mbuf for the life of self, exclusively through &mut self.
        unsafe { self.mbuf.as_mut() }
    }

    /// The port the frame arrived on.
    pub fn port(&self) -> u16 {
        self.raw().port
    }

    /// The RSS hash the NIC computed, when it did.
    pub fn rss_hash(&self) -> Option<u32> {
        let m = self.raw();
        if m.ol_flags & sys::RTE_MBUF_F_RX_RSS_HASH as u64 != 0 {
            // SAFETY: the RSS flag says the hash member of the union is the valid one.
            Some(unsafe { m.__bindgen_anon_2.hash.rss })
        } else {
            None
        }
    }

    pub fn is_contiguous(&self) -> bool {
        self.raw().nb_segs == 1
    }

    /// Copies `bytes` into a fresh mbuf from `pool`.
    pub fn from_bytes(pool: &Mempool, bytes: &[u8]) -> Option<Mbuf> {
        let mut mbuf = pool.alloc()?;
        if !mbuf.append(bytes.len()) {
            return None;
        }
        mbuf.data_mut().copy_from_slice(bytes);
        Some(mbuf)
    }

    fn into_raw(self) -> *mut sys::rte_mbuf {
        let ptr = self.mbuf.as_ptr();
        std::mem::forget(self);
        ptr
    }

    /// Pointer-sized prefetch of the frame's first cache line.
    #[inline]
    pub fn prefetch(&self) {
        let m = self.raw();
        // SAFETY: buf_addr + data_off points inside the mbuf's data room.
        prefetch_address(unsafe { m.buf_addr.cast::<u8>().add(m.data_off as usize) });
    }
}

/// Asks the CPU to bring the cache lines holding `value` closer (a hint: no effect on
/// program state). Used by the burst prefetch stage for conntrack slots and entries.
#[inline(always)]
pub fn prefetch_read<T>(value: &T) {
    let start = (value as *const T).cast::<u8>();
    let mut offset = 0;
    // Lines are 64 bytes on every CPU DPDK supports here; the loop unrolls (size is const).
    while offset < std::mem::size_of::<T>().max(1) {
        prefetch_address(start.wrapping_add(offset));
        offset += 64;
    }
}

/// Asks the kernel to back `region` with transparent huge pages (large per-worker tables:
/// conntrack index and entries, so a lookup costs a cache miss, not also a TLB walk).
/// Call it on a fresh, untouched allocation; a refusal (THP disabled) changes nothing.
pub fn advise_huge_pages<T>(region: &mut [std::mem::MaybeUninit<T>]) {
    const PAGE: usize = 4096;
    let start = region.as_mut_ptr() as usize;
    let end = start + std::mem::size_of_val(region);
    let aligned = start.next_multiple_of(PAGE);
    if end <= aligned + PAGE {
        return;
    }
    // SAFETY: the range lies inside `region`, which we borrow mutably; MADV_HUGEPAGE only
    // changes how the kernel backs these pages, never their contents.
    unsafe {
        libc::madvise(
            aligned as *mut std::ffi::c_void,
            (end - aligned) / PAGE * PAGE,
            libc::MADV_HUGEPAGE,
        );
    }
}

/// The prefetch instruction itself, inlined (DPDK's `rte_prefetch0` is a static inline
/// that reaches Rust only as an out-of-line wrapper call).
#[inline(always)]
fn prefetch_address(address: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `_mm_prefetch` only needs SSE, which every x86_64 CPU has; a prefetch is a
    // hint that never faults and has no architectural effect, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(address.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = address;
}

impl Frame for Mbuf {
    #[inline]
    fn data(&self) -> &[u8] {
        let m = self.raw();
        // SAFETY: for a single-segment mbuf the data_len bytes at buf_addr + data_off are
        // initialised packet data owned by this mbuf; the borrow is tied to &self.
        unsafe {
            std::slice::from_raw_parts(
                m.buf_addr.cast::<u8>().add(m.data_off as usize),
                m.data_len as usize,
            )
        }
    }

    #[inline]
    fn data_mut(&mut self) -> &mut [u8] {
        let m = self.raw();
        let (addr, off, len) = (
            m.buf_addr.cast::<u8>(),
            m.data_off as usize,
            m.data_len as usize,
        );
        // SAFETY: as in `data`, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(addr.add(off), len) }
    }

    // `prepend`, `adj` and `trim` run on every encapsulated, decapsulated or padded frame:
    // for the single segment the workers produce they are a few field updates here, not a
    // call into DPDK's out-of-line wrapper of its inline function (which does the same).
    #[inline(always)]
    fn prepend(&mut self, len: usize) -> bool {
        let Ok(len) = u16::try_from(len) else {
            return false;
        };
        let m = self.raw_mut();
        if m.nb_segs == 1 {
            if len > m.data_off {
                return false;
            }
            m.data_off -= len;
            m.data_len += len;
            m.pkt_len += u32::from(len);
            return true;
        }
        // SAFETY: we own the mbuf; rte_pktmbuf_prepend checks the headroom itself.
        !unsafe { sys::rte_pktmbuf_prepend(self.mbuf.as_ptr(), len) }.is_null()
    }

    #[inline(always)]
    fn adj(&mut self, len: usize) -> bool {
        let Ok(len) = u16::try_from(len) else {
            return false;
        };
        let m = self.raw_mut();
        if m.nb_segs == 1 {
            if len > m.data_len {
                return false;
            }
            m.data_off += len;
            m.data_len -= len;
            m.pkt_len -= u32::from(len);
            return true;
        }
        // SAFETY: we own the mbuf; rte_pktmbuf_adj checks the length itself.
        !unsafe { sys::rte_pktmbuf_adj(self.mbuf.as_ptr(), len) }.is_null()
    }

    #[inline(always)]
    fn trim(&mut self, len: usize) -> bool {
        let Ok(len) = u16::try_from(len) else {
            return false;
        };
        let m = self.raw_mut();
        if m.nb_segs == 1 {
            if len > m.data_len {
                return false;
            }
            m.data_len -= len;
            m.pkt_len -= u32::from(len);
            return true;
        }
        // SAFETY: we own the mbuf; rte_pktmbuf_trim checks the length itself.
        unsafe { sys::rte_pktmbuf_trim(self.mbuf.as_ptr(), len) == 0 }
    }

    fn append(&mut self, len: usize) -> bool {
        let Ok(len) = u16::try_from(len) else {
            return false;
        };
        // SAFETY: we own the mbuf; rte_pktmbuf_append checks the tailroom itself.
        !unsafe { sys::rte_pktmbuf_append(self.mbuf.as_ptr(), len) }.is_null()
    }
}

impl Drop for Mbuf {
    fn drop(&mut self) {
        // SAFETY: we are the only owner of this mbuf; it returns to its pool.
        unsafe { sys::rte_pktmbuf_free(self.mbuf.as_ptr()) };
    }
}

/// Up to `BURST_SIZE` mbufs received in one `rx_burst`. Taking them out transfers
/// ownership; whatever is left is freed when the burst is dropped or refilled.
pub struct RxBurst {
    mbufs: [*mut sys::rte_mbuf; BURST_SIZE],
    len: usize,
    next: usize,
}

impl Default for RxBurst {
    fn default() -> Self {
        RxBurst {
            mbufs: [std::ptr::null_mut(); BURST_SIZE],
            len: 0,
            next: 0,
        }
    }
}

impl RxBurst {
    fn free_rest(&mut self) {
        if self.next < self.len {
            // SAFETY: entries next..len are mbufs received and not yet handed out.
            unsafe {
                sys::rte_pktmbuf_free_bulk(
                    self.mbufs.as_mut_ptr().add(self.next),
                    (self.len - self.next) as c_uint,
                )
            };
        }
        self.len = 0;
        self.next = 0;
    }

    pub fn len(&self) -> usize {
        self.len - self.next
    }

    pub fn is_empty(&self) -> bool {
        self.len == self.next
    }

    /// The data of the frames not yet taken, in order (read-only; for the burst's
    /// prefetch stage, which looks at headers before any frame is processed).
    #[inline]
    pub fn pending_data(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.mbufs[self.next..self.len].iter().map(|&ptr| {
            // SAFETY: entries next..len are valid received single-segment mbufs this burst
            // owns; the slice covers their initialised data and borrows `self`, so no frame
            // can be taken (and mutated) while it lives.
            unsafe {
                let m = &*ptr;
                std::slice::from_raw_parts(
                    m.buf_addr.cast::<u8>().add(m.data_off as usize),
                    m.data_len as usize,
                )
            }
        })
    }

    /// Prefetches the first data line of every frame not yet taken, and the headroom line
    /// before it, where an encapsulation writes its outer headers (writing a cold line
    /// stalls as long as reading one).
    #[inline]
    pub fn prefetch_data(&self) {
        for &ptr in &self.mbufs[self.next..self.len] {
            // SAFETY: a valid received mbuf this burst owns; buf_addr + data_off points
            // inside its data room.
            let data = unsafe {
                let m = &*ptr;
                m.buf_addr.cast::<u8>().add(m.data_off as usize)
            };
            prefetch_address(data);
            prefetch_address(data.wrapping_sub(64));
        }
    }

    /// Takes the next frame, prefetching the one after it.
    #[inline]
    pub fn pop(&mut self) -> Option<Mbuf> {
        if self.next >= self.len {
            return None;
        }
        let ptr = self.mbufs[self.next];
        self.next += 1;
        if self.next < self.len {
            prefetch_address(self.mbufs[self.next].cast());
        }
        NonNull::new(ptr).map(|mbuf| Mbuf { mbuf })
    }
}

impl Drop for RxBurst {
    fn drop(&mut self) {
        self.free_rest();
    }
}

/// Frames waiting to be transmitted on one (port, queue); flushed once per burst.
pub struct TxBuffer {
    mbufs: [*mut sys::rte_mbuf; TxBuffer::CAPACITY],
    len: usize,
}

// SAFETY: the buffer owns the mbufs it holds (see Mbuf's Send).
unsafe impl Send for TxBuffer {}

impl Default for TxBuffer {
    fn default() -> Self {
        TxBuffer {
            mbufs: [std::ptr::null_mut(); TxBuffer::CAPACITY],
            len: 0,
        }
    }
}

impl TxBuffer {
    pub const CAPACITY: usize = 2 * BURST_SIZE;

    /// Queues `mbuf`; hands it back when the buffer is full (flush first).
    #[inline]
    pub fn push(&mut self, mbuf: Mbuf) -> std::result::Result<(), Mbuf> {
        if self.len == Self::CAPACITY {
            return Err(mbuf);
        }
        self.mbufs[self.len] = mbuf.into_raw();
        self.len += 1;
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn is_full(&self) -> bool {
        self.len == Self::CAPACITY
    }

    /// Frees every queued frame without sending it; returns how many.
    pub fn discard(&mut self) -> usize {
        let n = self.len;
        if n > 0 {
            // SAFETY: entries 0..len are mbufs we own.
            unsafe { sys::rte_pktmbuf_free_bulk(self.mbufs.as_mut_ptr(), n as c_uint) };
        }
        self.len = 0;
        n
    }
}

impl Drop for TxBuffer {
    fn drop(&mut self) {
        self.discard();
    }
}

/// Port and queue as DPDK numbers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortId(pub u16);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueId(pub u16);

/// How to bring a port up.
#[derive(Clone, Debug)]
pub struct PortSetup {
    pub rx_queues: u16,
    pub tx_queues: u16,
    pub rx_descriptors: u16,
    pub tx_descriptors: u16,
    pub mtu: Option<u16>,
    pub promiscuous: bool,
    /// Spread flows over the rx queues with RSS (IPv4 + TCP/UDP), when several.
    pub rss: bool,
}

/// What the driver reports about a port.
#[derive(Clone, Debug, Default)]
pub struct PortInfo {
    pub driver: String,
    pub max_rx_queues: u16,
    pub max_tx_queues: u16,
    pub rx_offload_capa: u64,
    pub tx_offload_capa: u64,
    pub flow_type_rss_offloads: u64,
    pub max_mtu: u16,
}

/// Queues of a port whose own counters `rte_eth_stats` carries (`RTE_ETHDEV_QUEUE_STAT_CNTRS`);
/// queues past these are counted in the port totals only.
pub const QUEUE_STAT_COUNTERS: usize = sys::RTE_ETHDEV_QUEUE_STAT_CNTRS as usize;

/// Counters the driver keeps for a port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortStats {
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_missed: u64,
    pub rx_errors: u64,
    pub tx_errors: u64,
    pub rx_no_mbuf: u64,
    /// Per-queue counters, by queue id. Drivers that keep them (net_tap, net_pcap,
    /// net_null, virtio) fill them; the others leave zeros.
    pub rx_queue_packets: [u64; QUEUE_STAT_COUNTERS],
    pub rx_queue_bytes: [u64; QUEUE_STAT_COUNTERS],
    pub tx_queue_packets: [u64; QUEUE_STAT_COUNTERS],
    pub tx_queue_bytes: [u64; QUEUE_STAT_COUNTERS],
}

/// An ethernet port (PCI or vdev) that EAL probed.
#[derive(Debug)]
pub struct Port {
    pub id: PortId,
    pub name: String,
    pub info: PortInfo,
    started: bool,
}

impl Port {
    /// The port EAL created for `name` (a vdev name like `net_tap0` or a PCI address).
    pub fn by_name(_eal: &Eal, name: &str) -> Result<Port> {
        let cname = CString::new(name).map_err(|_| Error {
            operation: format!("port name {name:?}"),
            code: 22,
        })?;
        let mut id: u16 = 0;
        // SAFETY: cname is a valid C string and id a valid out pointer.
        let ret = unsafe { sys::rte_eth_dev_get_port_by_name(cname.as_ptr(), &mut id) };
        check(
            format!("no DPDK port named {name:?} (is it in the EAL --vdev/-a arguments?)"),
            ret,
        )?;
        let mut info = sys::rte_eth_dev_info::default();
        // SAFETY: id is a valid port id and info a valid out pointer.
        let ret = unsafe { sys::rte_eth_dev_info_get(id, &mut info) };
        check(format!("rte_eth_dev_info_get({name})"), ret)?;
        let driver = if info.driver_name.is_null() {
            String::new()
        } else {
            // SAFETY: driver_name points to the driver's static NUL-terminated name.
            unsafe { CStr::from_ptr(info.driver_name) }
                .to_string_lossy()
                .into_owned()
        };
        Ok(Port {
            id: PortId(id),
            name: name.to_string(),
            info: PortInfo {
                driver,
                max_rx_queues: info.max_rx_queues,
                max_tx_queues: info.max_tx_queues,
                rx_offload_capa: info.rx_offload_capa,
                tx_offload_capa: info.tx_offload_capa,
                flow_type_rss_offloads: info.flow_type_rss_offloads,
                max_mtu: info.max_mtu,
            },
            started: false,
        })
    }

    /// Configures queues (receiving into `pool`), MTU and RSS, then starts the port.
    pub fn start(&mut self, setup: &PortSetup, pool: &Mempool) -> Result<()> {
        let name = &self.name;
        if setup.rx_queues > self.info.max_rx_queues || setup.tx_queues > self.info.max_tx_queues {
            return Err(Error {
                operation: format!(
                    "port {name}: {} rx / {} tx queues requested, driver {} allows {} / {}",
                    setup.rx_queues,
                    setup.tx_queues,
                    self.info.driver,
                    self.info.max_rx_queues,
                    self.info.max_tx_queues
                ),
                code: 22,
            });
        }
        if let Some(mtu) = setup.mtu {
            if self.info.max_mtu != 0 && mtu > self.info.max_mtu {
                return Err(Error {
                    operation: format!(
                        "port {name}: mtu {mtu} exceeds what driver {} allows ({})",
                        self.info.driver, self.info.max_mtu
                    ),
                    code: 22,
                });
            }
        }
        let mut conf = sys::rte_eth_conf::default();
        let rss_hf = RSS_IPV4_TCP_UDP & self.info.flow_type_rss_offloads;
        if setup.rss && setup.rx_queues > 1 && rss_hf != 0 {
            conf.rxmode.mq_mode = sys::rte_eth_rx_mq_mode_RTE_ETH_MQ_RX_RSS;
            conf.rx_adv_conf.rss_conf.rss_hf = rss_hf;
            // Symmetric RSS: the 0x6d5a-repeated Toeplitz key hashes both directions of a
            // flow to the same queue (Woo & Park, 2012).
            conf.rx_adv_conf.rss_conf.rss_key = SYMMETRIC_RSS_KEY.as_ptr() as *mut u8;
            conf.rx_adv_conf.rss_conf.rss_key_len = SYMMETRIC_RSS_KEY.len() as u8;
        }
        if let Some(mtu) = setup.mtu {
            conf.rxmode.mtu = u32::from(mtu);
        }
        // SAFETY: the port id is valid and conf a valid, fully initialised configuration
        // whose rss_key points to a static array.
        let ret = unsafe {
            sys::rte_eth_dev_configure(self.id.0, setup.rx_queues, setup.tx_queues, &conf)
        };
        check(format!("rte_eth_dev_configure({name})"), ret)?;
        let mut rx_desc = setup.rx_descriptors;
        let mut tx_desc = setup.tx_descriptors;
        // SAFETY: valid port id and pointers to our locals.
        let ret =
            unsafe { sys::rte_eth_dev_adjust_nb_rx_tx_desc(self.id.0, &mut rx_desc, &mut tx_desc) };
        check(format!("rte_eth_dev_adjust_nb_rx_tx_desc({name})"), ret)?;
        // SAFETY: valid port id.
        let socket = unsafe { sys::rte_eth_dev_socket_id(self.id.0) };
        for queue in 0..setup.rx_queues {
            // SAFETY: configured port, queue index below the configured count, a null
            // rx_conf means driver defaults, and the pool outlives the port (Runtime order).
            let ret = unsafe {
                sys::rte_eth_rx_queue_setup(
                    self.id.0,
                    queue,
                    rx_desc,
                    socket.max(0) as c_uint,
                    std::ptr::null(),
                    pool.as_ptr(),
                )
            };
            check(
                format!("rte_eth_rx_queue_setup({name}, queue {queue})"),
                ret,
            )?;
        }
        for queue in 0..setup.tx_queues {
            // SAFETY: as above; a null tx_conf means driver defaults.
            let ret = unsafe {
                sys::rte_eth_tx_queue_setup(
                    self.id.0,
                    queue,
                    tx_desc,
                    socket.max(0) as c_uint,
                    std::ptr::null(),
                )
            };
            check(
                format!("rte_eth_tx_queue_setup({name}, queue {queue})"),
                ret,
            )?;
        }
        // SAFETY: configured port with every queue set up.
        let ret = unsafe { sys::rte_eth_dev_start(self.id.0) };
        check(format!("rte_eth_dev_start({name})"), ret)?;
        self.started = true;
        if setup.promiscuous {
            // SAFETY: started port; not every PMD supports it, which is not an error here.
            unsafe { sys::rte_eth_promiscuous_enable(self.id.0) };
        }
        Ok(())
    }

    /// The port's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        let mut addr = sys::rte_ether_addr::default();
        // SAFETY: valid port id and out pointer.
        unsafe { sys::rte_eth_macaddr_get(self.id.0, &mut addr) };
        addr.addr_bytes
    }

    pub fn stats(&self) -> PortStats {
        port_stats(self.id)
    }

    /// Receives up to `BURST_SIZE` frames from `queue` into `burst` (whose previous
    /// contents are freed first). Returns how many arrived.
    #[inline]
    pub fn rx_burst(&self, queue: QueueId, burst: &mut RxBurst) -> usize {
        rx_burst(self.id, queue, burst)
    }

    /// Stops the port; frames still in its rings return to their pool.
    pub fn stop(&mut self) {
        if self.started {
            // SAFETY: valid, started port; no worker polls it any more (caller's order).
            unsafe { sys::rte_eth_dev_stop(self.id.0) };
            self.started = false;
        }
    }
}

impl Drop for Port {
    fn drop(&mut self) {
        self.stop();
        // SAFETY: the port is stopped and no worker uses it; close releases its queues
        // (and their mbufs) once.
        unsafe { sys::rte_eth_dev_close(self.id.0) };
    }
}

/// Driver counters of any port (for the control side, which holds only ids).
pub fn port_stats(port: PortId) -> PortStats {
    let mut stats = sys::rte_eth_stats::default();
    // SAFETY: valid out pointer; an invalid id makes DPDK return an error and leaves zeros.
    unsafe { sys::rte_eth_stats_get(port.0, &mut stats) };
    PortStats {
        rx_packets: stats.ipackets,
        tx_packets: stats.opackets,
        rx_bytes: stats.ibytes,
        tx_bytes: stats.obytes,
        rx_missed: stats.imissed,
        rx_errors: stats.ierrors,
        tx_errors: stats.oerrors,
        rx_no_mbuf: stats.rx_nombuf,
        rx_queue_packets: stats.q_ipackets,
        rx_queue_bytes: stats.q_ibytes,
        tx_queue_packets: stats.q_opackets,
        tx_queue_bytes: stats.q_obytes,
    }
}

/// Whether the port's link is up, as the driver last saw it (`rte_eth_link_get_nowait`:
/// never waits for autonegotiation, so the control thread can poll it). An id DPDK does
/// not know reads as down.
pub fn link_up(port: PortId) -> bool {
    let mut link = sys::rte_eth_link::default();
    // SAFETY: valid out pointer; an invalid id makes DPDK return an error, checked below.
    let rc = unsafe { sys::rte_eth_link_get_nowait(port.0, &mut link) };
    rc == 0 && u32::from(link.link_status()) == sys::RTE_ETH_LINK_UP
}

/// `rx_burst` by id: workers hold only ids; the `Port` values stay with the runtime.
#[inline]
pub fn rx_burst(port: PortId, queue: QueueId, burst: &mut RxBurst) -> usize {
    burst.free_rest();
    // SAFETY: the array has BURST_SIZE slots; this worker is the only poller of the
    // (port, queue) pair (worker assignment guarantees it), as DPDK requires.
    let n = unsafe {
        sys::rte_eth_rx_burst(port.0, queue.0, burst.mbufs.as_mut_ptr(), BURST_SIZE as u16)
    };
    burst.len = n as usize;
    burst.next = 0;
    burst.len
}

/// Transmits what `buffer` holds on (port, queue); frees and returns the count of
/// frames the NIC refused.
#[inline]
pub fn tx_flush(port: PortId, queue: QueueId, buffer: &mut TxBuffer) -> (usize, usize) {
    if buffer.len == 0 {
        return (0, 0);
    }
    let total = buffer.len;
    let mut sent = 0usize;
    // Retry a little: a virtual NIC's ring often frees room within a few calls.
    for _ in 0..4 {
        // SAFETY: entries sent..total are mbufs we own; the PMD takes ownership of the
        // ones it accepts. This worker is the only user of the (port, queue) tx pair.
        let n = unsafe {
            sys::rte_eth_tx_burst(
                port.0,
                queue.0,
                buffer.mbufs.as_mut_ptr().add(sent),
                (total - sent) as u16,
            )
        };
        sent += n as usize;
        if sent == total {
            break;
        }
    }
    let refused = total - sent;
    if refused > 0 {
        // SAFETY: entries sent..total were not accepted and are still ours.
        unsafe {
            sys::rte_pktmbuf_free_bulk(buffer.mbufs.as_mut_ptr().add(sent), refused as c_uint)
        };
    }
    buffer.len = 0;
    (sent, refused)
}

/// RTE_ETH_RSS_IPV4 | FRAG_IPV4 | NONFRAG_IPV4_TCP | NONFRAG_IPV4_UDP | NONFRAG_IPV4_OTHER
/// (function-like macros bindgen cannot translate).
const RSS_IPV4_TCP_UDP: u64 = (1 << 2) | (1 << 3) | (1 << 4) | (1 << 5) | (1 << 7);

/// Toeplitz key whose 16-bit period makes the hash symmetric in (src, dst) and (sport, dport).
static SYMMETRIC_RSS_KEY: [u8; 40] = [
    0x6d, 0x5a, 0x6d, 0x5a, 0x6d, 0x5a, 0x6d, 0x5a, 0x6d, 0x5a, 0x6d, 0x5a, 0x6d, 0x5a, 0x6d, 0x5a,
    0x6d, 0x5a, 0x6d, 0x5a, 0x6d, 0x5a, 0x6d, 0x5a, 0x6d, 0x5a, 0x6d, 0x5a, 0x6d, 0x5a, 0x6d, 0x5a,
    0x6d, 0x5a, 0x6d, 0x5a, 0x6d, 0x5a, 0x6d, 0x5a,
];

// ---------------------------------------------------------------------------------------
// Telemetry: servicegate's own commands beside ethdev's on DPDK's telemetry socket
// (/var/run/dpdk/<file-prefix>/dpdk_telemetry.v2, what `dpdk-telemetry.py -f PREFIX` reads).

/// A value in a telemetry answer. DPDK 22.11 nests one level: a top-level dict may hold
/// `U64Array` and `Dict` containers whose own values are plain.
#[derive(Clone, Debug, PartialEq)]
pub enum TelemetryValue {
    U64(u64),
    Int(i32),
    /// At most 127 bytes (RTE_TEL_MAX_STRING_LEN − 1); longer strings are cut.
    Str(String),
    U64Array(Vec<u64>),
    Dict(TelemetryDict),
}

/// A dict answer: (name, value) pairs. Names are letters, digits, `_` and `/` only
/// (DPDK refuses others); at most 256 entries per dict.
pub type TelemetryDict = Vec<(String, TelemetryValue)>;

/// What a command runs: its parameters (the text after the comma) in, a dict out. It runs
/// on DPDK's telemetry thread, never on a worker.
pub type TelemetryHandler = Box<dyn Fn(&str) -> TelemetryDict + Send + Sync>;

/// The handlers of registered commands, by command name. Read only when a telemetry client
/// asks (the telemetry thread), written at registration.
static TELEMETRY_HANDLERS: parking_lot::Mutex<Vec<(String, std::sync::Arc<TelemetryHandler>)>> =
    parking_lot::Mutex::new(Vec::new());

/// Registers `cmd` (e.g. `/servicegate/workers`) on the telemetry socket with `help`;
/// `handler` answers it. Needs EAL initialised (with telemetry on, the default).
pub fn register_telemetry(cmd: &str, help: &str, handler: TelemetryHandler) -> Result<()> {
    let invalid = |what: &str| Error {
        operation: format!("telemetry command {cmd:?}: {what}"),
        code: libc::EINVAL,
    };
    let c_cmd = CString::new(cmd).map_err(|_| invalid("contains NUL"))?;
    let c_help = CString::new(help).map_err(|_| invalid("help contains NUL"))?;
    TELEMETRY_HANDLERS
        .lock()
        .push((cmd.to_string(), std::sync::Arc::new(handler)));
    // SAFETY: both strings are valid NUL-terminated C strings for the call (DPDK copies
    // them into its own table); the callback is an `extern "C"` fn with the telemetry_cb
    // signature that never unwinds (see `telemetry_callback`).
    let ret = unsafe {
        sys::rte_telemetry_register_cmd(c_cmd.as_ptr(), Some(telemetry_callback), c_help.as_ptr())
    };
    check(format!("rte_telemetry_register_cmd({cmd})"), ret).map(|_| ())
}

/// DPDK's telemetry thread calls this for every registered servicegate command: it finds
/// the handler by name and fills `info`. A panic inside a handler is caught (it must not
/// unwind into C) and answered as an error.
extern "C" fn telemetry_callback(
    cmd: *const std::ffi::c_char,
    params: *const std::ffi::c_char,
    info: *mut sys::rte_tel_data,
) -> c_int {
    if cmd.is_null() || info.is_null() {
        return -libc::EINVAL;
    }
    // SAFETY: DPDK passes NUL-terminated strings valid for the duration of the call;
    // `params` is null when the client gave none.
    let (cmd, params) = unsafe {
        (
            CStr::from_ptr(cmd).to_string_lossy().into_owned(),
            if params.is_null() {
                String::new()
            } else {
                CStr::from_ptr(params).to_string_lossy().into_owned()
            },
        )
    };
    let handler = TELEMETRY_HANDLERS
        .lock()
        .iter()
        .find(|(name, _)| *name == cmd)
        .map(|(_, h)| std::sync::Arc::clone(h));
    let Some(handler) = handler else {
        return -libc::ENOENT;
    };
    let Ok(dict) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler(&params)))
    else {
        return -libc::EIO;
    };
    // SAFETY: `info` is the telemetry library's data object for this answer, valid and
    // exclusively ours until we return.
    unsafe { fill_telemetry_dict(info, &dict) };
    0
}

/// A C string for a telemetry name or string value: interior NULs end it, and it is cut to
/// what DPDK stores (RTE_TEL_MAX_STRING_LEN bytes with the NUL), at a char boundary.
fn telemetry_cstring(s: &str) -> CString {
    let s = s.split('\0').next().unwrap_or("");
    let mut end = s.len().min(sys::RTE_TEL_MAX_STRING_LEN as usize - 1);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    CString::new(&s[..end]).unwrap_or_default()
}

/// Writes `dict` into `d` (started here as a dict). Entries DPDK refuses (a bad name, past
/// 256 entries, a container nested too deep) are left out: an answer is never refused
/// whole for one of them.
///
/// # Safety
/// `d` must be a valid `rte_tel_data` the caller may fill (the callback's `info`, or a
/// container from `rte_tel_data_alloc`).
unsafe fn fill_telemetry_dict(d: *mut sys::rte_tel_data, dict: &TelemetryDict) {
    // SAFETY: `d` is valid per this function's contract.
    unsafe { sys::rte_tel_data_start_dict(d) };
    for (name, value) in dict {
        let c_name = telemetry_cstring(name);
        // SAFETY: `d` is a started dict; names and strings are valid C strings for the
        // call (DPDK copies them); a container is a fresh allocation handed over with
        // keep = 0, so DPDK frees it with the answer (or we free it if refused).
        unsafe {
            match value {
                TelemetryValue::U64(v) => {
                    sys::rte_tel_data_add_dict_u64(d, c_name.as_ptr(), *v);
                }
                TelemetryValue::Int(v) => {
                    sys::rte_tel_data_add_dict_int(d, c_name.as_ptr(), *v);
                }
                TelemetryValue::Str(s) => {
                    let c_value = telemetry_cstring(s);
                    sys::rte_tel_data_add_dict_string(d, c_name.as_ptr(), c_value.as_ptr());
                }
                TelemetryValue::U64Array(values) => {
                    let array = sys::rte_tel_data_alloc();
                    if array.is_null() {
                        continue;
                    }
                    sys::rte_tel_data_start_array(array, sys::rte_tel_value_type_RTE_TEL_U64_VAL);
                    for v in values {
                        sys::rte_tel_data_add_array_u64(array, *v);
                    }
                    if sys::rte_tel_data_add_dict_container(d, c_name.as_ptr(), array, 0) != 0 {
                        sys::rte_tel_data_free(array);
                    }
                }
                TelemetryValue::Dict(inner) => {
                    let container = sys::rte_tel_data_alloc();
                    if container.is_null() {
                        continue;
                    }
                    let plain: TelemetryDict = inner
                        .iter()
                        .filter(|(_, v)| {
                            !matches!(v, TelemetryValue::Dict(_) | TelemetryValue::U64Array(_))
                        })
                        .cloned()
                        .collect();
                    fill_telemetry_dict(container, &plain);
                    if sys::rte_tel_data_add_dict_container(d, c_name.as_ptr(), container, 0) != 0 {
                        sys::rte_tel_data_free(container);
                    }
                }
            }
        }
    }
}

/// Largest datagram a reassembled frame may hold: an mbuf's data room is a `u16` that
/// includes the headroom.
pub const REASSEMBLED_MAX: usize = u16::MAX as usize - sys::RTE_PKTMBUF_HEADROOM as usize;

/// Most fragments one datagram may arrive in (`RTE_LIBRTE_IP_FRAG_MAX_FRAG`).
pub const FRAGMENTS_PER_DATAGRAM: usize = sys::RTE_LIBRTE_IP_FRAG_MAX_FRAG as usize;

/// Most fragments [`fragment_ipv4`] cuts a datagram into (65,535 bytes at a 1,280-byte MTU).
pub const FRAGMENTS_OUT_MAX: usize = 64;

/// What [`Reassembly::add`] did with a fragment.
pub enum Reassembled {
    /// Held until its datagram is complete.
    Pending,
    /// The whole datagram, in one contiguous mbuf from the datagram pool, starting at the
    /// first fragment's Ethernet header, with a valid IPv4 header checksum.
    Complete(Mbuf),
}

/// One worker's IPv4 reassembly: DPDK's fragment table (`rte_ip_frag`), bounded in
/// datagrams and in time, and the pool whole datagrams are copied into so that the pipeline
/// sees one contiguous frame. Fragments the table gives up on (timed out, duplicate or
/// overlapping, more than [`FRAGMENTS_PER_DATAGRAM`], the table full) are freed here and
/// counted by [`Reassembly::take_freed`].
pub struct Reassembly {
    table: NonNull<sys::rte_ip_frag_tbl>,
    death_row: Box<sys::rte_ip_frag_death_row>,
    datagrams: std::sync::Arc<Mempool>,
    freed: u64,
    /// Fragments seen lately, by a hash of [`FragmentId`]: rte_ip_frag gives up a whole
    /// datagram when one of its fragments arrives twice, where Linux drops only the copy.
    /// An exact copy seen within the timeout is dropped here before it reaches the table.
    recent: Box<[(FragmentId, u64); RECENT_FRAGMENTS]>,
    timeout_tsc: u64,
}

/// Fragments [`Reassembly`] remembers to recognise exact copies (direct-mapped).
const RECENT_FRAGMENTS: usize = 1024;

/// What makes two fragments copies of each other: the datagram (addresses, protocol,
/// identification) and the piece (flags and offset, length).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct FragmentId {
    addresses: u64,
    ident_protocol: u32,
    flags_offset_length: u32,
}

impl FragmentId {
    fn of(ip: &[u8]) -> Option<FragmentId> {
        let h = ip.first_chunk::<20>()?;
        Some(FragmentId {
            addresses: u64::from_be_bytes(h[12..20].try_into().ok()?),
            ident_protocol: u32::from_be_bytes([h[4], h[5], h[9], 0]),
            flags_offset_length: u32::from_be_bytes([h[6], h[7], h[2], h[3]]),
        })
    }

    fn slot(&self) -> usize {
        let mixed = crate::maglev::fmix64(
            self.addresses
                ^ (u64::from(self.ident_protocol) << 17)
                ^ u64::from(self.flags_offset_length),
        );
        (mixed as usize) & (RECENT_FRAGMENTS - 1)
    }
}

// SAFETY: the table and the mbufs it holds belong to this value alone; it moves to the
// worker's lcore with the worker and is only used there.
unsafe impl Send for Reassembly {}

impl Reassembly {
    /// A table of at most `max_datagrams` datagrams in progress, each given up after
    /// `timeout_tsc` TSC cycles; whole datagrams are copied into mbufs of `datagrams`
    /// (whose data room should hold [`REASSEMBLED_MAX`] bytes).
    pub fn new(
        max_datagrams: u32,
        timeout_tsc: u64,
        datagrams: std::sync::Arc<Mempool>,
    ) -> Result<Reassembly> {
        let max_datagrams = max_datagrams.max(1);
        // Four-way buckets, twice as many entries as datagrams: rte_ip_frag's own sizing.
        let buckets = (max_datagrams * 2).div_ceil(4).next_power_of_two();
        // SAFETY: plain sizes; the table is allocated from DPDK's heap (EAL is up, since a
        // mempool exists) and returned to it in Drop.
        let table = unsafe {
            sys::rte_ip_frag_table_create(buckets, 4, max_datagrams, timeout_tsc.max(1), -1)
        };
        let table = NonNull::new(table).ok_or(Error {
            operation: format!("rte_ip_frag_table_create({max_datagrams} datagrams)"),
            code: rte_errno(),
        })?;
        Ok(Reassembly {
            table,
            death_row: Box::default(),
            datagrams,
            freed: 0,
            recent: vec![(FragmentId::default(), 0); RECENT_FRAGMENTS]
                .try_into()
                .unwrap_or_else(|_| unreachable!("RECENT_FRAGMENTS entries")),
            timeout_tsc: timeout_tsc.max(1),
        })
    }

    /// Adds `fragment` (an IPv4 fragment after `l2` bytes of Ethernet header) at TSC time
    /// `now_tsc`.
    pub fn add(&mut self, mut fragment: Mbuf, l2: usize, now_tsc: u64) -> Reassembled {
        let (ip_offset, l3) = {
            let data = fragment.data();
            match data.get(l2) {
                Some(&version_ihl) if l2 < 128 => (l2, usize::from(version_ihl & 0x0f) * 4),
                _ => {
                    self.freed += 1;
                    return Reassembled::Pending;
                }
            }
        };
        let Some(id) = FragmentId::of(&fragment.data()[ip_offset..]) else {
            self.freed += 1;
            return Reassembled::Pending;
        };
        let recent = &mut self.recent[id.slot()];
        if recent.0 == id && now_tsc.wrapping_sub(recent.1) < self.timeout_tsc {
            self.freed += 1;
            return Reassembled::Pending;
        }
        *recent = (id, now_tsc);
        let port = fragment.port();
        let m = fragment.raw_mut();
        // l2_len is bits 0-6 and l3_len bits 7-15 of tx_offload: rte_ip_frag reads them.
        m.__bindgen_anon_3.tx_offload = (ip_offset as u64) | ((l3 as u64) << 7);
        let ip_header = fragment.data_mut()[ip_offset..].as_mut_ptr();
        // SAFETY: the table and death row are ours; the fragment is a valid single-segment
        // mbuf whose ownership passes to the table (it is held, freed to the death row, or
        // chained into the returned datagram); `ip_header` points at its IPv4 header, which
        // the pipeline validated (length, checksum) before asking for reassembly.
        let whole = unsafe {
            sys::rte_ipv4_frag_reassemble_packet(
                self.table.as_ptr(),
                &mut *self.death_row,
                fragment.into_raw(),
                now_tsc,
                ip_header.cast(),
            )
        };
        self.free_death_row();
        let Some(whole) = NonNull::new(whole) else {
            return Reassembled::Pending;
        };
        let whole = Mbuf { mbuf: whole };
        match self.contiguous_copy(&whole, port, ip_offset) {
            Some(copy) => Reassembled::Complete(copy),
            None => {
                // Too large for one mbuf, or the datagram pool is empty: every fragment is
                // lost, as the table would have lost them.
                self.freed += u64::from(whole.raw().nb_segs);
                Reassembled::Pending
            }
        }
    }

    /// `whole` (a chain) in one mbuf of the datagram pool, with its IPv4 header checksum
    /// filled (rte_ip_frag leaves it zero).
    fn contiguous_copy(&self, whole: &Mbuf, port: u16, ip_offset: usize) -> Option<Mbuf> {
        let len = whole.raw().pkt_len as usize;
        if len > REASSEMBLED_MAX {
            return None;
        }
        let mut copy = self.datagrams.alloc()?;
        if !copy.append(len) {
            return None;
        }
        let dst = copy.data_mut().as_mut_ptr();
        // SAFETY: `whole` is a valid chain of pkt_len bytes; `dst` has room for `len` bytes
        // (just appended). rte_pktmbuf_read copies into `dst` when the data is segmented and
        // returns a pointer into the mbuf when it is not; both are copied below.
        let read = unsafe {
            sys::rte_pktmbuf_read(whole.mbuf.as_ptr(), 0, len as u32, dst.cast::<c_void>())
        };
        if read.is_null() {
            return None;
        }
        if read.cast::<u8>() != dst {
            // SAFETY: `read` points at `len` bytes inside `whole`, disjoint from `copy`.
            unsafe { std::ptr::copy_nonoverlapping(read.cast::<u8>(), dst, len) };
        }
        copy.raw_mut().port = port;
        let ip = copy.data_mut().get_mut(ip_offset..)?;
        let mut ip = crate::wire::ipv4::Ipv4Packet::new_checked(ip).ok()?;
        ip.fill_checksum();
        Some(copy)
    }

    /// Frees the fragments of datagrams older than the timeout.
    pub fn expire(&mut self, now_tsc: u64) {
        // SAFETY: the table and death row are ours.
        unsafe {
            sys::rte_ip_frag_table_del_expired_entries(
                self.table.as_ptr(),
                &mut *self.death_row,
                now_tsc,
            )
        };
        self.free_death_row();
    }

    fn free_death_row(&mut self) {
        if self.death_row.cnt > 0 {
            self.freed += u64::from(self.death_row.cnt);
            // SAFETY: the death row holds mbufs the table gave up; freeing them empties it.
            unsafe { sys::rte_ip_frag_free_death_row(&mut *self.death_row, 0) };
        }
    }

    /// Fragments freed without being reassembled since the last call.
    pub fn take_freed(&mut self) -> u64 {
        std::mem::take(&mut self.freed)
    }
}

impl Drop for Reassembly {
    fn drop(&mut self) {
        self.free_death_row();
        // SAFETY: the table came from rte_ip_frag_table_create; destroying it frees the
        // fragments it still holds.
        unsafe { sys::rte_ip_frag_table_destroy(self.table.as_ptr()) };
    }
}

/// The fragments [`fragment_ipv4`] cut, taken in order; those not taken are freed.
pub struct Fragments {
    mbufs: [*mut sys::rte_mbuf; FRAGMENTS_OUT_MAX],
    len: usize,
    next: usize,
}

impl Fragments {
    pub fn len(&self) -> usize {
        self.len - self.next
    }

    pub fn is_empty(&self) -> bool {
        self.len == self.next
    }

    pub fn pop(&mut self) -> Option<Mbuf> {
        if self.next >= self.len {
            return None;
        }
        let ptr = self.mbufs[self.next];
        self.next += 1;
        NonNull::new(ptr).map(|mbuf| Mbuf { mbuf })
    }
}

impl Drop for Fragments {
    fn drop(&mut self) {
        while self.pop().is_some() {}
    }
}

/// Cuts `packet` (starting at its IPv4 header, without DF) into fragments of at most
/// `ip_mtu` bytes, copied into fresh mbufs of `pool` with the usual headroom for the link
/// headers (`rte_ipv4_fragment_copy_nonseg_packet`); their IPv4 header checksums are left
/// zero. The error is DPDK's errno.
pub fn fragment_ipv4(
    packet: &Mbuf,
    ip_mtu: u16,
    pool: &Mempool,
) -> std::result::Result<Fragments, i32> {
    let mut fragments = Fragments {
        mbufs: [std::ptr::null_mut(); FRAGMENTS_OUT_MAX],
        len: 0,
        next: 0,
    };
    if !packet.is_contiguous() {
        return Err(22);
    }
    // SAFETY: `packet` is a valid single-segment mbuf the function only reads; `mbufs` has
    // room for the FRAGMENTS_OUT_MAX pointers passed; the pool is valid. On success the
    // first `n` entries are fresh mbufs we own (freed by `Fragments`); on failure the
    // function freed whatever it had made.
    let n = unsafe {
        sys::rte_ipv4_fragment_copy_nonseg_packet(
            packet.mbuf.as_ptr(),
            fragments.mbufs.as_mut_ptr(),
            FRAGMENTS_OUT_MAX as u16,
            ip_mtu,
            pool.as_ptr(),
        )
    };
    if n < 0 {
        return Err(-n);
    }
    fragments.len = (n as usize).min(FRAGMENTS_OUT_MAX);
    Ok(fragments)
}

/// Lets DPDK's packet capture (`rte_pdump`) serve secondary processes: `servicegate ctl
/// capture` and `dpdk-dumpcap`. Call once in the gateway after EAL init; until a capture
/// asks, nothing runs per packet beyond ethdev's check for rx/tx callbacks.
pub fn pdump_init() -> Result<()> {
    // SAFETY: EAL is initialised (the caller holds the runtime); registers a multi-process
    // action and a memzone, nothing we own.
    check("rte_pdump_init", unsafe { sys::rte_pdump_init() }).map(|_| ())
}

// rte_pdump.h's flags (an anonymous enum) and queue wildcard.
const PDUMP_FLAG_RX: u32 = 1;
const PDUMP_FLAG_TX: u32 = 2;
const PDUMP_FLAG_PCAPNG: u32 = 4;
const PDUMP_ALL_QUEUES: u16 = u16::MAX;

/// What to capture from a running gateway.
#[derive(Clone, Debug)]
pub struct CaptureSpec {
    /// The port's EAL device name (`net_tap0`, a PCI address).
    pub device: String,
    /// One rx/tx queue, or every queue.
    pub queue: Option<u16>,
    pub rx: bool,
    pub tx: bool,
    /// libpcap filter syntax (`tcp port 80`), run as eBPF by rte_bpf in the gateway.
    pub filter: Option<String>,
    /// Bytes kept of each frame.
    pub snaplen: u32,
}

/// A capture running in the gateway on behalf of this process (a DPDK secondary): the
/// gateway's rx/tx callbacks (`rte_pdump`) copy matching frames, in pcapng form
/// (`rte_pcapng_copy`), into a ring this process drains into a pcapng file
/// (`rte_pcapng_write_packets`). Dropping it stops the capture and closes the file.
pub struct PortCapture {
    port: u16,
    queue: u16,
    flags: u32,
    ring: NonNull<sys::rte_ring>,
    pool: Mempool,
    pcapng: NonNull<sys::rte_pcapng>,
    filter: Option<NonNull<sys::rte_bpf_prm>>,
    started_ns: u64,
    /// Frames written so far.
    pub written: u64,
}

impl PortCapture {
    /// Starts capturing per `spec` into `file` (truncated, written as pcapng).
    pub fn start(eal: &Eal, spec: &CaptureSpec, file: std::fs::File) -> Result<PortCapture> {
        let err = |operation: String, code: i32| Error { operation, code };
        let device = CString::new(spec.device.as_str())
            .map_err(|_| err(format!("device name {:?}", spec.device), 22))?;
        let mut port = 0u16;
        // SAFETY: a valid C string and a valid out pointer.
        check(format!("port {:?} in the gateway", spec.device), unsafe {
            sys::rte_eth_dev_get_port_by_name(device.as_ptr(), &mut port)
        })?;
        let filter = match &spec.filter {
            Some(expression) => Some(compile_filter(expression, spec.snaplen)?),
            None => None,
        };
        let tag = std::process::id();
        let ring_name = CString::new(format!("sg_capture_{tag}")).expect("no NUL");
        // SAFETY: a valid name. rte_pdump accepts only multi-producer, multi-consumer rings.
        let ring = unsafe { sys::rte_ring_create(ring_name.as_ptr(), 4096, -1, 0) };
        let ring = NonNull::new(ring)
            .ok_or_else(|| err("rte_ring_create (capture ring)".into(), rte_errno()))?;
        // SAFETY: a pure size computation.
        let data_room = unsafe { sys::rte_pcapng_mbuf_size(spec.snaplen) };
        let pool = Mempool::new(
            eal,
            &format!("sg_capture_pool_{tag}"),
            4095,
            0,
            (data_room as u16).saturating_sub(sys::RTE_PKTMBUF_HEADROOM as u16),
        )?;
        use std::os::fd::IntoRawFd;
        let fd = file.into_raw_fd();
        let app =
            CString::new(format!("servicegate {}", env!("CARGO_PKG_VERSION"))).expect("no NUL");
        // SAFETY: `fd` is an open file we hand over (rte_pcapng_close closes it); the
        // strings are valid for the call (copied into the section header).
        let pcapng = unsafe {
            sys::rte_pcapng_fdopen(
                fd,
                std::ptr::null(),
                std::ptr::null(),
                app.as_ptr(),
                std::ptr::null(),
            )
        };
        let pcapng = NonNull::new(pcapng).ok_or_else(|| {
            // SAFETY: the fd is still ours when fdopen failed.
            unsafe { libc::close(fd) };
            err("rte_pcapng_fdopen".into(), rte_errno())
        })?;
        let queue = spec.queue.unwrap_or(PDUMP_ALL_QUEUES);
        let flags =
            (if spec.rx { PDUMP_FLAG_RX } else { 0 }) | (if spec.tx { PDUMP_FLAG_TX } else { 0 });
        let mut capture = PortCapture {
            port,
            queue,
            flags,
            ring,
            pool,
            pcapng,
            filter,
            started_ns: now_ns(),
            written: 0,
        };
        // SAFETY: the ring and pool live in shared memory the gateway can use, and stay until
        // `Drop` disabled the capture; the filter (if any) likewise.
        let enabled = unsafe {
            sys::rte_pdump_enable_bpf(
                port,
                queue,
                flags | PDUMP_FLAG_PCAPNG,
                spec.snaplen,
                capture.ring.as_ptr(),
                capture.pool.as_ptr(),
                capture
                    .filter
                    .map_or(std::ptr::null(), |f| f.as_ptr().cast_const()),
            )
        };
        if let Err(e) = check(format!("rte_pdump_enable_bpf(port {port})"), enabled) {
            capture.flags = 0;
            return Err(e);
        }
        Ok(capture)
    }

    /// Writes what the gateway has copied so far, at most `max` frames; how many.
    pub fn drain(&mut self, max: u64) -> Result<usize> {
        let mut mbufs = [std::ptr::null_mut::<sys::rte_mbuf>(); BURST_SIZE];
        let mut total = 0;
        loop {
            let want = (max - total as u64).min(BURST_SIZE as u64) as c_uint;
            if want == 0 {
                return Ok(total);
            }
            // SAFETY: a valid ring of mbuf pointers; room for `want` <= BURST_SIZE of them.
            let n = unsafe {
                sys::rte_ring_dequeue_burst(
                    self.ring.as_ptr(),
                    mbufs.as_mut_ptr().cast(),
                    want,
                    std::ptr::null_mut(),
                )
            } as usize;
            if n == 0 {
                return Ok(total);
            }
            // SAFETY: `n` mbufs made by rte_pcapng_copy, ours; the call always frees them.
            let written = unsafe {
                sys::rte_pcapng_write_packets(self.pcapng.as_ptr(), mbufs.as_mut_ptr(), n as u16)
            };
            if written < 0 {
                return Err(Error {
                    operation: "rte_pcapng_write_packets".into(),
                    code: std::io::Error::last_os_error().raw_os_error().unwrap_or(5),
                });
            }
            self.written += n as u64;
            total += n;
        }
    }
}

impl Drop for PortCapture {
    fn drop(&mut self) {
        if self.flags != 0 {
            // SAFETY: the capture this value enabled.
            unsafe { sys::rte_pdump_disable(self.port, self.queue, self.flags) };
        }
        // Copies made past the count, or before the disable took effect, are not written.
        let mut mbufs = [std::ptr::null_mut::<sys::rte_mbuf>(); BURST_SIZE];
        loop {
            // SAFETY: a valid ring of mbuf pointers; room for BURST_SIZE of them.
            let n = unsafe {
                sys::rte_ring_dequeue_burst(
                    self.ring.as_ptr(),
                    mbufs.as_mut_ptr().cast(),
                    BURST_SIZE as c_uint,
                    std::ptr::null_mut(),
                )
            };
            if n == 0 {
                break;
            }
            // SAFETY: `n` mbufs of our pool, ours to free.
            unsafe { sys::rte_pktmbuf_free_bulk(mbufs.as_mut_ptr(), n) };
        }
        let comment = CString::new("servicegate ctl capture").expect("no NUL");
        // SAFETY: the open capture file; the comment is valid for the call.
        unsafe {
            sys::rte_pcapng_write_stats(
                self.pcapng.as_ptr(),
                self.port,
                comment.as_ptr(),
                self.started_ns,
                now_ns(),
                self.written,
                0,
            );
            sys::rte_pcapng_close(self.pcapng.as_ptr());
            sys::rte_ring_free(self.ring.as_ptr());
            if let Some(filter) = self.filter {
                sys::rte_free(filter.as_ptr().cast());
            }
        }
    }
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// A libpcap filter expression as DPDK eBPF (libpcap's compiler, `rte_bpf_convert`).
fn compile_filter(expression: &str, snaplen: u32) -> Result<NonNull<sys::rte_bpf_prm>> {
    let text = CString::new(expression).map_err(|_| Error {
        operation: format!("filter {expression:?}"),
        code: 22,
    })?;
    // SAFETY: a "dead" handle only compiles filters; closed below on every path.
    let pcap = unsafe { sys::pcap_open_dead(sys::DLT_EN10MB as c_int, snaplen as c_int) };
    if pcap.is_null() {
        return Err(Error {
            operation: "pcap_open_dead".into(),
            code: 12,
        });
    }
    let mut program = sys::bpf_program::default();
    // SAFETY: valid handle, out struct and C string.
    let compiled = unsafe {
        sys::pcap_compile(
            pcap,
            &mut program,
            text.as_ptr(),
            1,
            sys::PCAP_NETMASK_UNKNOWN,
        )
    };
    let result = if compiled != 0 {
        // SAFETY: pcap_geterr returns the handle's NUL-terminated message.
        let message = unsafe { CStr::from_ptr(sys::pcap_geterr(pcap)) }
            .to_string_lossy()
            .into_owned();
        Err(Error {
            operation: format!("filter {expression:?}: {message}"),
            code: 22,
        })
    } else {
        // SAFETY: a program pcap_compile filled; the result is rte_malloc'ed and ours.
        let converted = unsafe { sys::rte_bpf_convert(&program) };
        // SAFETY: the program pcap_compile allocated.
        unsafe { sys::pcap_freecode(&mut program) };
        NonNull::new(converted).ok_or_else(|| Error {
            operation: format!("rte_bpf_convert({expression:?})"),
            code: rte_errno(),
        })
    };
    // SAFETY: the handle opened above.
    unsafe { sys::pcap_close(pcap) };
    result
}
