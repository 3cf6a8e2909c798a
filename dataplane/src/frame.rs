//! A packet buffer the pipeline can rewrite in place: a DPDK mbuf on the real path, a plain
//! byte buffer with headroom in table tests and the fuzz target. Every stage works on
//! `&mut impl Frame`, so the bytes-in → bytes-out tests exercise the same code the workers run.

/// Room reserved in front of a frame for encapsulation (VXLAN adds 50 bytes, an ICMP error
/// 28); DPDK's default mbuf headroom is 128 too.
pub const HEADROOM: usize = 128;

pub trait Frame {
    fn data(&self) -> &[u8];
    fn data_mut(&mut self) -> &mut [u8];
    /// Grows the frame at the front by `len` bytes; false when the headroom is too small.
    fn prepend(&mut self, len: usize) -> bool;
    /// Removes `len` bytes from the front; false when the frame is shorter.
    fn adj(&mut self, len: usize) -> bool;
    /// Removes `len` bytes from the tail; false when the frame is shorter.
    fn trim(&mut self, len: usize) -> bool;
    /// Grows the frame at the tail by `len` bytes; false when the buffer is too small.
    fn append(&mut self, len: usize) -> bool;

    fn len(&self) -> usize {
        self.data().len()
    }

    fn is_empty(&self) -> bool {
        self.data().is_empty()
    }

    /// Sets the length to `len` by trimming or appending at the tail.
    fn resize(&mut self, len: usize) -> bool {
        let current = self.len();
        if len <= current {
            self.trim(current - len)
        } else {
            self.append(len - current)
        }
    }
}

/// A frame in an owned buffer with `HEADROOM` bytes in front and room for a jumbo tail.
#[derive(Clone, Debug)]
pub struct VecFrame {
    buffer: Vec<u8>,
    start: usize,
    end: usize,
}

impl VecFrame {
    /// Largest frame a `VecFrame` holds (like a 2 KiB mbuf data room minus headroom).
    pub const CAPACITY: usize = 2048;

    pub fn new(bytes: &[u8]) -> VecFrame {
        let mut buffer = vec![0u8; HEADROOM + Self::CAPACITY.max(bytes.len())];
        buffer[HEADROOM..HEADROOM + bytes.len()].copy_from_slice(bytes);
        VecFrame {
            buffer,
            start: HEADROOM,
            end: HEADROOM + bytes.len(),
        }
    }

    /// Replaces the contents with `bytes` (at most [`Self::CAPACITY`]), reusing the buffer
    /// the way a driver refills an mbuf.
    pub fn refill(&mut self, bytes: &[u8]) {
        let len = bytes.len().min(self.buffer.len() - HEADROOM);
        self.buffer[HEADROOM..HEADROOM + len].copy_from_slice(&bytes[..len]);
        self.start = HEADROOM;
        self.end = HEADROOM + len;
    }

    pub fn into_vec(self) -> Vec<u8> {
        self.buffer[self.start..self.end].to_vec()
    }
}

impl Frame for VecFrame {
    fn data(&self) -> &[u8] {
        &self.buffer[self.start..self.end]
    }

    fn data_mut(&mut self) -> &mut [u8] {
        &mut self.buffer[self.start..self.end]
    }

    fn prepend(&mut self, len: usize) -> bool {
        if len > self.start {
            return false;
        }
        self.start -= len;
        true
    }

    fn adj(&mut self, len: usize) -> bool {
        if len > self.end - self.start {
            return false;
        }
        self.start += len;
        true
    }

    fn trim(&mut self, len: usize) -> bool {
        if len > self.end - self.start {
            return false;
        }
        self.end -= len;
        true
    }

    fn append(&mut self, len: usize) -> bool {
        if self.end + len > self.buffer.len() {
            return false;
        }
        self.buffer[self.end..self.end + len].fill(0);
        self.end += len;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepend_adj_trim_append_keep_bounds() {
        let mut frame = VecFrame::new(&[1, 2, 3, 4]);
        assert!(frame.prepend(2));
        frame.data_mut()[..2].copy_from_slice(&[9, 9]);
        assert_eq!(frame.data(), &[9, 9, 1, 2, 3, 4]);
        assert!(frame.adj(3));
        assert!(frame.trim(1));
        assert_eq!(frame.data(), &[2, 3]);
        assert!(frame.append(2));
        assert_eq!(frame.data(), &[2, 3, 0, 0]);
        assert!(!frame.adj(5));
        assert!(!frame.prepend(HEADROOM + 10));
        assert!(frame.resize(1));
        assert_eq!(frame.data(), &[2]);
    }
}
