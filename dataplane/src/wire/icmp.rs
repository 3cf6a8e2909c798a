//! ICMPv4 messages (RFC 792): echo, and the errors a gateway sends or translates
//! (destination unreachable, time exceeded), which embed the original IPv4 header and the
//! first 8 bytes of its payload.

use super::checksum;
use super::{Error, Field, Result};

/// Length of the ICMP header (type, code, checksum, and the 4-byte rest of header).
pub const HEADER_LEN: usize = 8;

/// Type: echo reply.
pub const TYPE_ECHO_REPLY: u8 = 0;
/// Type: destination unreachable.
pub const TYPE_DEST_UNREACHABLE: u8 = 3;
/// Type: echo request.
pub const TYPE_ECHO_REQUEST: u8 = 8;
/// Type: time exceeded.
pub const TYPE_TIME_EXCEEDED: u8 = 11;

/// Destination unreachable code: net unreachable.
pub const CODE_NET_UNREACHABLE: u8 = 0;
/// Destination unreachable code: host unreachable.
pub const CODE_HOST_UNREACHABLE: u8 = 1;
/// Destination unreachable code: protocol unreachable.
pub const CODE_PROTO_UNREACHABLE: u8 = 2;
/// Destination unreachable code: port unreachable.
pub const CODE_PORT_UNREACHABLE: u8 = 3;
/// Destination unreachable code: fragmentation needed and DF set (carries the next-hop MTU).
pub const CODE_FRAG_NEEDED: u8 = 4;
/// Destination unreachable code: communication administratively prohibited.
pub const CODE_ADMIN_PROHIBITED: u8 = 13;
/// Time exceeded code: TTL exceeded in transit.
pub const CODE_TTL_EXCEEDED: u8 = 0;
/// Time exceeded code: fragment reassembly time exceeded.
pub const CODE_REASSEMBLY_EXCEEDED: u8 = 1;

mod field {
    use super::Field;
    pub const TYPE: usize = 0;
    pub const CODE: usize = 1;
    pub const CHECKSUM: Field = 2..4;
    pub const ECHO_IDENT: Field = 4..6;
    pub const ECHO_SEQNO: Field = 6..8;
    /// Unused (zero) in errors; in frag-needed, bytes 4..6 are unused too.
    pub const UNUSED: Field = 4..8;
    /// Next-hop MTU of a frag-needed message (RFC 1191).
    pub const MTU: Field = 6..8;
}

/// A view of an ICMPv4 message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IcmpPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> IcmpPacket<T> {
    /// Length of the ICMP header.
    pub const HEADER_LEN: usize = HEADER_LEN;

    /// A view without any check.
    pub const fn new_unchecked(buffer: T) -> Self {
        IcmpPacket { buffer }
    }

    /// A view of received bytes: at least the 8-byte header.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let p = Self::new_unchecked(buffer);
        p.check_len()?;
        Ok(p)
    }

    /// `Err(Truncated)` unless the buffer holds the 8-byte header.
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

    /// Message type.
    pub fn msg_type(&self) -> u8 {
        self.buffer.as_ref()[field::TYPE]
    }

    /// Message code.
    pub fn msg_code(&self) -> u8 {
        self.buffer.as_ref()[field::CODE]
    }

    /// Checksum as on the wire.
    pub fn checksum(&self) -> u16 {
        self.u16_at(field::CHECKSUM)
    }

    /// Identifier of an echo request or reply.
    pub fn echo_ident(&self) -> u16 {
        self.u16_at(field::ECHO_IDENT)
    }

    /// Sequence number of an echo request or reply.
    pub fn echo_seq_no(&self) -> u16 {
        self.u16_at(field::ECHO_SEQNO)
    }

    /// Next-hop MTU of a frag-needed message (0 from pre-RFC 1191 routers).
    pub fn next_hop_mtu(&self) -> u16 {
        self.u16_at(field::MTU)
    }

    /// Whether this is an error that embeds an original packet (dest-unreachable or
    /// time-exceeded).
    pub fn is_error(&self) -> bool {
        matches!(self.msg_type(), TYPE_DEST_UNREACHABLE | TYPE_TIME_EXCEEDED)
    }

    /// Everything after the 8-byte header: echo data, or for errors the original IPv4 header
    /// and at least the first 8 bytes of its payload (its ports). The embedded header's
    /// `total_len` describes the original packet, not what is embedded.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..]
    }

    /// Whether the checksum over the whole message is right.
    pub fn verify_checksum(&self) -> bool {
        checksum::compute(0, self.buffer.as_ref()) == 0
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> IcmpPacket<T> {
    fn set_u16_at(&mut self, f: Field, value: u16) {
        self.buffer.as_mut()[f].copy_from_slice(&value.to_be_bytes());
    }

    /// Sets the message type.
    pub fn set_msg_type(&mut self, value: u8) {
        self.buffer.as_mut()[field::TYPE] = value;
    }

    /// Sets the message code.
    pub fn set_msg_code(&mut self, value: u8) {
        self.buffer.as_mut()[field::CODE] = value;
    }

    /// Sets the checksum field.
    pub fn set_checksum(&mut self, value: u16) {
        self.set_u16_at(field::CHECKSUM, value);
    }

    /// Sets the echo identifier.
    pub fn set_echo_ident(&mut self, value: u16) {
        self.set_u16_at(field::ECHO_IDENT, value);
    }

    /// Sets the echo sequence number.
    pub fn set_echo_seq_no(&mut self, value: u16) {
        self.set_u16_at(field::ECHO_SEQNO, value);
    }

    /// Zeroes the 4 bytes after the checksum (the "unused" field of errors).
    pub fn clear_rest_of_header(&mut self) {
        self.buffer.as_mut()[field::UNUSED].fill(0);
    }

    /// Sets the next-hop MTU of a frag-needed message.
    pub fn set_next_hop_mtu(&mut self, mtu: u16) {
        self.set_u16_at(field::MTU, mtu);
    }

    /// Computes and writes the checksum over the whole message.
    pub fn fill_checksum(&mut self) {
        self.set_checksum(0);
        let sum = checksum::compute(0, self.buffer.as_ref());
        self.set_checksum(sum);
    }

    /// Everything after the header, mutable.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[HEADER_LEN..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Echo request, ident 0x1234, seq 1, payload "abcd".
    static ECHO: [u8; 12] = [
        0x08, 0x00, 0x21, 0x04, 0x12, 0x34, 0x00, 0x01, 0x61, 0x62, 0x63, 0x64,
    ];

    /// Frag-needed with MTU 1400 carrying an original header + 8 bytes (UDP 1234 -> 53).
    static FRAG_NEEDED: [u8; 36] = [
        0x03, 0x04, 0x00, 0x00, 0x00, 0x00, 0x05, 0x78, // type, code, checksum, MTU
        0x45, 0x00, 0x05, 0xdc, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0x0a, 0x00, 0x00,
        0x01, 0x0a, 0x00, 0x00, 0x02, // original IPv4 header
        0x04, 0xd2, 0x00, 0x35, 0x05, 0xc8, 0x00, 0x00, // original UDP header
    ];

    #[test]
    fn deconstruct_echo() {
        let p = IcmpPacket::new_checked(&ECHO[..]).unwrap();
        assert_eq!(p.msg_type(), TYPE_ECHO_REQUEST);
        assert_eq!(p.msg_code(), 0);
        assert_eq!(p.checksum(), 0x2104);
        assert!(p.verify_checksum());
        assert_eq!(p.echo_ident(), 0x1234);
        assert_eq!(p.echo_seq_no(), 1);
        assert!(!p.is_error());
        assert_eq!(p.payload(), b"abcd");
    }

    #[test]
    fn construct_echo() {
        let mut buf = [0u8; 12];
        let mut p = IcmpPacket::new_unchecked(&mut buf[..]);
        p.set_msg_type(TYPE_ECHO_REQUEST);
        p.set_msg_code(0);
        p.set_echo_ident(0x1234);
        p.set_echo_seq_no(1);
        p.payload_mut().copy_from_slice(b"abcd");
        p.fill_checksum();
        assert_eq!(buf, ECHO);
    }

    #[test]
    fn frag_needed() {
        let mut buf = FRAG_NEEDED;
        let mut p = IcmpPacket::new_unchecked(&mut buf[..]);
        p.fill_checksum();
        let p = IcmpPacket::new_checked(&buf[..]).unwrap();
        assert_eq!(
            (p.msg_type(), p.msg_code()),
            (TYPE_DEST_UNREACHABLE, CODE_FRAG_NEEDED)
        );
        assert!(p.is_error());
        assert_eq!(p.next_hop_mtu(), 1400);
        assert!(p.verify_checksum());
        let inner = super::super::Ipv4Packet::new_unchecked(p.payload());
        assert_eq!(inner.dst(), std::net::Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(&p.payload()[20..24], &[0x04, 0xd2, 0x00, 0x35]);

        let mut buf = [0xffu8; 36];
        let mut q = IcmpPacket::new_unchecked(&mut buf[..]);
        q.set_msg_type(TYPE_DEST_UNREACHABLE);
        q.set_msg_code(CODE_FRAG_NEEDED);
        q.clear_rest_of_header();
        q.set_next_hop_mtu(1400);
        q.payload_mut().copy_from_slice(&FRAG_NEEDED[8..]);
        q.fill_checksum();
        assert_eq!(&buf[..], p.into_inner());
    }

    #[test]
    fn port_unreachable_constants() {
        assert_eq!((TYPE_DEST_UNREACHABLE, CODE_PORT_UNREACHABLE), (3, 3));
        assert_eq!((TYPE_DEST_UNREACHABLE, CODE_FRAG_NEEDED), (3, 4));
        assert_eq!(TYPE_TIME_EXCEEDED, 11);
    }

    #[test]
    fn malformed() {
        assert_eq!(
            IcmpPacket::new_checked(&ECHO[..7]).unwrap_err(),
            Error::Truncated
        );
        let mut bad = ECHO;
        bad[9] ^= 1;
        assert!(!IcmpPacket::new_checked(&bad[..]).unwrap().verify_checksum());
    }
}
