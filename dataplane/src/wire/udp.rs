//! UDP datagrams (RFC 768).

use super::checksum;
use super::ipv4::PROTO_UDP;
use super::{Error, Field, Result};
use std::net::Ipv4Addr;

/// Length of the UDP header.
pub const HEADER_LEN: usize = 8;

mod field {
    use super::Field;
    pub const SRC_PORT: Field = 0..2;
    pub const DST_PORT: Field = 2..4;
    pub const LENGTH: Field = 4..6;
    pub const CHECKSUM: Field = 6..8;
}

/// A view of a UDP datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> UdpPacket<T> {
    /// Length of the UDP header.
    pub const HEADER_LEN: usize = HEADER_LEN;

    /// A view without any check.
    pub const fn new_unchecked(buffer: T) -> Self {
        UdpPacket { buffer }
    }

    /// A view of received bytes; see [`check_len`](Self::check_len).
    pub fn new_checked(buffer: T) -> Result<Self> {
        let p = Self::new_unchecked(buffer);
        p.check_len()?;
        Ok(p)
    }

    /// The buffer holds the header (`Truncated`), the length field is at least 8
    /// (`Malformed`) and fits in the buffer (`Truncated`).
    pub fn check_len(&self) -> Result<()> {
        let len = self.buffer.as_ref().len();
        if len < HEADER_LEN {
            return Err(Error::Truncated);
        }
        let field_len = usize::from(self.len());
        if field_len < HEADER_LEN {
            return Err(Error::Malformed);
        }
        if field_len > len {
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

    /// Length field: header plus payload.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> u16 {
        self.u16_at(field::LENGTH)
    }

    /// Checksum as on the wire (0: none).
    pub fn checksum(&self) -> u16 {
        self.u16_at(field::CHECKSUM)
    }

    /// The payload, bounded by the length field.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..usize::from(self.len())]
    }

    /// Whether the checksum is right over the IPv4 pseudo-header; a checksum of 0 ("none")
    /// is accepted.
    pub fn verify_checksum(&self, src: Ipv4Addr, dst: Ipv4Addr) -> bool {
        if self.checksum() == 0 {
            return true;
        }
        let len = self.len();
        let data = &self.buffer.as_ref()[..usize::from(len)];
        checksum::compute(checksum::pseudo_header_v4(src, dst, PROTO_UDP, len), data) == 0
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> UdpPacket<T> {
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

    /// Sets the length field.
    pub fn set_len(&mut self, len: u16) {
        self.set_u16_at(field::LENGTH, len);
    }

    /// Sets the checksum field.
    pub fn set_checksum(&mut self, value: u16) {
        self.set_u16_at(field::CHECKSUM, value);
    }

    /// Computes and writes the checksum over the pseudo-header and `len()` bytes; a
    /// computed 0 is written as 0xffff.
    pub fn fill_checksum(&mut self, src: Ipv4Addr, dst: Ipv4Addr) {
        self.set_checksum(0);
        let len = self.len();
        let data = &self.buffer.as_ref()[..usize::from(len)];
        let sum = checksum::compute(checksum::pseudo_header_v4(src, dst, PROTO_UDP, len), data);
        self.set_checksum(checksum::udp_nonzero(sum));
    }

    /// The payload (bounded by the length field), mutable.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let end = usize::from(self.len());
        &mut self.buffer.as_mut()[HEADER_LEN..end]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 1);
    const DST: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 2);

    /// 1234 -> 53, 4 bytes payload, one trailing byte that is not part of the datagram.
    static PACKET: [u8; 13] = [
        0x04, 0xd2, 0x00, 0x35, 0x00, 0x0c, 0x00, 0x00, // checksum filled by the tests
        0x01, 0x02, 0x03, 0x04, 0xee,
    ];

    fn with_checksum() -> [u8; 13] {
        let mut buf = PACKET;
        UdpPacket::new_unchecked(&mut buf[..]).fill_checksum(SRC, DST);
        buf
    }

    #[test]
    fn deconstruct() {
        let buf = with_checksum();
        let p = UdpPacket::new_checked(&buf[..]).unwrap();
        assert_eq!(p.src_port(), 1234);
        assert_eq!(p.dst_port(), 53);
        assert_eq!(p.len(), 12);
        assert_eq!(p.payload(), &[1, 2, 3, 4]);
        // Checksum computed by hand over pseudo-header + datagram.
        assert_eq!(p.checksum(), 0x7375);
        assert!(p.verify_checksum(SRC, DST));
        assert!(!p.verify_checksum(SRC, Ipv4Addr::new(192, 168, 1, 3)));
    }

    #[test]
    fn construct() {
        let mut buf = [0u8; 13];
        buf[12] = 0xee;
        let mut p = UdpPacket::new_unchecked(&mut buf[..]);
        p.set_src_port(1234);
        p.set_dst_port(53);
        p.set_len(12);
        p.payload_mut().copy_from_slice(&[1, 2, 3, 4]);
        p.fill_checksum(SRC, DST);
        assert_eq!(buf, with_checksum());
    }

    #[test]
    fn zero_checksum_means_none() {
        let buf = PACKET;
        let p = UdpPacket::new_checked(&buf[..]).unwrap();
        assert_eq!(p.checksum(), 0);
        assert!(p.verify_checksum(SRC, DST));
    }

    #[test]
    fn malformed() {
        let err = |b: &[u8]| UdpPacket::new_checked(b).unwrap_err();
        assert_eq!(err(&PACKET[..7]), Error::Truncated);
        assert_eq!(err(&PACKET[..11]), Error::Truncated); // length 12 > buffer
        let mut bad = PACKET;
        bad[5] = 7; // length < 8
        assert_eq!(err(&bad), Error::Malformed);
    }
}
