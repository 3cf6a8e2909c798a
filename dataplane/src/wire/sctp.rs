//! The SCTP common header (RFC 9260 section 3.1) and its CRC32c checksum (appendix A).
//!
//! The checksum is CRC32c over the whole SCTP packet with the checksum field zeroed. The
//! CRC value is stored least significant byte first (as the RFC's reference code does on the
//! reflected CRC), so [`SctpPacket::checksum`] reads the field little-endian: it is then
//! equal to the plain CRC32c value.

use super::{Error, Field, Result};

/// Length of the common header.
pub const HEADER_LEN: usize = 12;

/// Chunk type: DATA.
pub const CHUNK_DATA: u8 = 0;
/// Chunk type: INIT.
pub const CHUNK_INIT: u8 = 1;
/// Chunk type: INIT ACK.
pub const CHUNK_INIT_ACK: u8 = 2;
/// Chunk type: ABORT.
pub const CHUNK_ABORT: u8 = 6;

mod field {
    use super::Field;
    pub const SRC_PORT: Field = 0..2;
    pub const DST_PORT: Field = 2..4;
    pub const VERIFICATION_TAG: Field = 4..8;
    pub const CHECKSUM: Field = 8..12;
}

/// A view of an SCTP packet: the common header and its chunks (the whole IPv4 payload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SctpPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> SctpPacket<T> {
    /// Length of the common header.
    pub const HEADER_LEN: usize = HEADER_LEN;

    /// A view without any check.
    pub const fn new_unchecked(buffer: T) -> Self {
        SctpPacket { buffer }
    }

    /// A view of received bytes: at least the 12-byte common header.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let p = Self::new_unchecked(buffer);
        p.check_len()?;
        Ok(p)
    }

    /// `Err(Truncated)` unless the buffer holds the common header.
    pub fn check_len(&self) -> Result<()> {
        if self.buffer.as_ref().len() < HEADER_LEN {
            return Err(Error::Truncated);
        }
        Ok(())
    }

    /// The underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    fn u16_at(&self, f: Field) -> u16 {
        let b = &self.buffer.as_ref()[f];
        u16::from_be_bytes([b[0], b[1]])
    }

    /// Source port.
    pub fn src_port(&self) -> u16 {
        self.u16_at(field::SRC_PORT)
    }

    /// Destination port.
    pub fn dst_port(&self) -> u16 {
        self.u16_at(field::DST_PORT)
    }

    /// Verification tag (0 in a packet carrying INIT).
    pub fn verification_tag(&self) -> u32 {
        let b = &self.buffer.as_ref()[field::VERIFICATION_TAG];
        u32::from_be_bytes([b[0], b[1], b[2], b[3]])
    }

    /// The checksum field as a CRC32c value (read little-endian, see the module docs).
    pub fn checksum(&self) -> u32 {
        let b = &self.buffer.as_ref()[field::CHECKSUM];
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    /// CRC32c of the whole packet with the checksum field taken as zero.
    pub fn compute_checksum(&self) -> u32 {
        let b = self.buffer.as_ref();
        let crc = crc32c::crc32c(&b[..field::CHECKSUM.start]);
        let crc = crc32c::crc32c_append(crc, &[0; 4]);
        crc32c::crc32c_append(crc, &b[field::CHECKSUM.end..])
    }

    /// Whether the checksum field matches the packet.
    pub fn verify_checksum(&self) -> bool {
        self.checksum() == self.compute_checksum()
    }

    /// The chunks.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> SctpPacket<T> {
    fn set_u16_at(&mut self, f: Field, value: u16) {
        self.buffer.as_mut()[f].copy_from_slice(&value.to_be_bytes());
    }

    /// Sets the source port.
    pub fn set_src_port(&mut self, port: u16) {
        self.set_u16_at(field::SRC_PORT, port);
    }

    /// Sets the destination port.
    pub fn set_dst_port(&mut self, port: u16) {
        self.set_u16_at(field::DST_PORT, port);
    }

    /// Sets the verification tag.
    pub fn set_verification_tag(&mut self, tag: u32) {
        self.buffer.as_mut()[field::VERIFICATION_TAG].copy_from_slice(&tag.to_be_bytes());
    }

    /// Writes a CRC32c value into the checksum field (little-endian, see the module docs).
    pub fn set_checksum(&mut self, crc: u32) {
        self.buffer.as_mut()[field::CHECKSUM].copy_from_slice(&crc.to_le_bytes());
    }

    /// Computes and writes the checksum. A NAT rewriting ports must call this: CRC32c has
    /// no incremental update like the Internet checksum's.
    pub fn fill_checksum(&mut self) {
        let crc = self.compute_checksum();
        self.set_checksum(crc);
    }

    /// The chunks, mutable.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[HEADER_LEN..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A captured SCTP packet with one INIT chunk: 4068 -> 3868 (Diameter), tag 0, initiate
    /// tag 0xbb7b0f9c, a_rwnd 64000, 10/10 streams, initial TSN 0xbb7b0f9c. The checksum
    /// bytes 9f 78 a7 04 are CRC32c 0x04a7789f.
    static INIT: [u8; 32] = [
        0x0f, 0xe4, 0x0f, 0x1c, 0x00, 0x00, 0x00, 0x00, 0x9f, 0x78, 0xa7, 0x04, // header
        0x01, 0x00, 0x00, 0x14, 0xbb, 0x7b, 0x0f, 0x9c, 0x00, 0x00, 0xfa, 0x00, 0x00, 0x0a, 0x00,
        0x0a, 0xbb, 0x7b, 0x0f, 0x9c, // INIT chunk
    ];

    #[test]
    fn crc32c_check_values() {
        // The standard check value, and RFC 3720 B.4: 32 bytes of zeros.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c::crc32c(&[0; 32]), 0x8a91_36aa);
    }

    #[test]
    fn deconstruct_init() {
        let p = SctpPacket::new_checked(&INIT[..]).unwrap();
        assert_eq!(p.src_port(), 4068);
        assert_eq!(p.dst_port(), 3868);
        assert_eq!(p.verification_tag(), 0);
        assert_eq!(p.checksum(), 0x04a7_789f);
        assert_eq!(p.compute_checksum(), 0x04a7_789f);
        assert!(p.verify_checksum());
        assert_eq!(p.payload()[0], CHUNK_INIT);
        assert_eq!(p.payload().len(), 20);
    }

    #[test]
    fn construct_init() {
        let mut buf = [0u8; 32];
        let mut p = SctpPacket::new_unchecked(&mut buf[..]);
        p.set_src_port(4068);
        p.set_dst_port(3868);
        p.set_verification_tag(0);
        p.payload_mut().copy_from_slice(&INIT[12..]);
        p.set_checksum(0xdead_beef); // ignored by the computation
        p.fill_checksum();
        assert_eq!(buf, INIT);
    }

    #[test]
    fn corrupted() {
        let mut bad = INIT;
        bad[31] ^= 0x01;
        assert!(!SctpPacket::new_checked(&bad[..]).unwrap().verify_checksum());
        let mut bad = INIT;
        bad[8..12].reverse(); // stored big-endian: wrong
        assert!(!SctpPacket::new_checked(&bad[..]).unwrap().verify_checksum());
        assert_eq!(
            SctpPacket::new_checked(&INIT[..11]).unwrap_err(),
            Error::Truncated
        );
    }
}
