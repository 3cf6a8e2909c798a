//! VXLAN headers (RFC 7348): 8 bytes between the outer UDP header and the inner Ethernet
//! frame.

use super::{Error, Field, Result};

/// IANA UDP port of VXLAN.
pub const VXLAN_PORT: u16 = 4789;
/// Length of the VXLAN header.
pub const HEADER_LEN: usize = 8;
/// The I flag: the VNI is valid. Must be set.
pub const FLAG_I: u8 = 0x08;

mod field {
    use super::Field;
    pub const FLAGS: usize = 0;
    pub const RESERVED1: Field = 1..4;
    pub const VNI: Field = 4..7;
    pub const RESERVED2: usize = 7;
}

/// A view of a VXLAN header and the inner frame after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> VxlanPacket<T> {
    /// Length of the VXLAN header.
    pub const HEADER_LEN: usize = HEADER_LEN;

    /// A view without any check.
    pub const fn new_unchecked(buffer: T) -> Self {
        VxlanPacket { buffer }
    }

    /// A view of received bytes: the header fits (`Truncated`) and the I flag is set
    /// (`Malformed`, RFC 7348: such packets are dropped).
    pub fn new_checked(buffer: T) -> Result<Self> {
        let p = Self::new_unchecked(buffer);
        p.check_len()?;
        if p.flags() & FLAG_I == 0 {
            return Err(Error::Malformed);
        }
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

    /// The flags byte.
    pub fn flags(&self) -> u8 {
        self.buffer.as_ref()[field::FLAGS]
    }

    /// The 24-bit VXLAN network identifier.
    pub fn vni(&self) -> u32 {
        let b = &self.buffer.as_ref()[field::VNI];
        u32::from_be_bytes([0, b[0], b[1], b[2]])
    }

    /// The inner Ethernet frame.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> VxlanPacket<T> {
    /// Writes a fresh header: flags = I, reserved fields zero, this VNI.
    pub fn init(&mut self, vni: u32) {
        let b = self.buffer.as_mut();
        b[field::FLAGS] = FLAG_I;
        b[field::RESERVED1].fill(0);
        b[field::RESERVED2] = 0;
        self.set_vni(vni);
    }

    /// Sets the flags byte.
    pub fn set_flags(&mut self, flags: u8) {
        self.buffer.as_mut()[field::FLAGS] = flags;
    }

    /// Sets the VNI (the low 24 bits of `vni`).
    pub fn set_vni(&mut self, vni: u32) {
        debug_assert!(vni < 1 << 24, "VNI is 24 bits");
        self.buffer.as_mut()[field::VNI].copy_from_slice(&vni.to_be_bytes()[1..]);
    }

    /// The inner Ethernet frame, mutable.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[HEADER_LEN..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static PACKET: [u8; 10] = [0x08, 0x00, 0x00, 0x00, 0x12, 0x34, 0x56, 0x00, 0xaa, 0xbb];

    #[test]
    fn deconstruct() {
        let p = VxlanPacket::new_checked(&PACKET[..]).unwrap();
        assert_eq!(p.flags(), FLAG_I);
        assert_eq!(p.vni(), 0x12_3456);
        assert_eq!(p.payload(), &[0xaa, 0xbb]);
    }

    #[test]
    fn construct() {
        let mut buf = [0xffu8; 10];
        let mut p = VxlanPacket::new_unchecked(&mut buf[..]);
        p.init(0x12_3456);
        p.payload_mut().copy_from_slice(&[0xaa, 0xbb]);
        assert_eq!(buf, PACKET);
        let mut p = VxlanPacket::new_unchecked(&mut buf[..]);
        p.set_vni(7);
        p.set_flags(FLAG_I);
        assert_eq!(p.vni(), 7);
    }

    #[test]
    fn malformed() {
        assert_eq!(
            VxlanPacket::new_checked(&PACKET[..7]).unwrap_err(),
            Error::Truncated
        );
        let mut bad = PACKET;
        bad[0] = 0x00; // no I flag
        assert_eq!(
            VxlanPacket::new_checked(&bad[..]).unwrap_err(),
            Error::Malformed
        );
        assert!(VxlanPacket::new_checked(&PACKET[..8])
            .unwrap()
            .payload()
            .is_empty());
        assert_eq!((VXLAN_PORT, HEADER_LEN), (4789, 8));
    }
}
