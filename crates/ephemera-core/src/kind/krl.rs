//! The OpenSSH key revocation list (KRL) encoder, after OpenSSH's `PROTOCOL.krl`. No Rust crate
//! writes KRLs, so this small one is ours. Pure: the content is a function of the replicated
//! state ([`crate::state::ssh_krl`]), so every node serves byte-identical KRLs for the same
//! applied index.
//!
//! Layout (all integers big-endian; `string` is a `uint32` length and the bytes):
//!
//! ```text
//! uint64 KRL_MAGIC ("SSHKRL\n\0")   uint32 format version (1)
//! uint64 krl_version                uint64 generated_date (Unix seconds)
//! uint64 flags (0)                  string reserved ("")      string comment
//! then sections, each: byte type, string data
//!   1 certificates:   string ca_key, string reserved, then subsections: byte type, string data
//!                     0x20 serial list: uint64 serial ...
//!   2 explicit keys:  string public_key_blob ...
//! ```
//!
//! Written: one certificate section per CA key, its revoked serials as one sorted serial list,
//! and one explicit-key section listing revoked CA keys (which revokes every certificate they
//! signed). No signature section: OpenSSH 9.4 and later refuse signed KRLs, and ours come from
//! the cluster over TLS. Sections go in increasing type order, as `ssh-keygen -k` writes them.

use crate::kind::ssh::put_string;

pub const MAGIC: &[u8; 8] = b"SSHKRL\n\0";
pub const FORMAT_VERSION: u32 = 1;
pub const SECTION_CERTIFICATES: u8 = 1;
pub const SECTION_EXPLICIT_KEY: u8 = 2;
pub const CERT_SERIAL_LIST: u8 = 0x20;
/// Comment written into every KRL.
pub const COMMENT: &str = "ephemera";

/// What a KRL says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Krl {
    /// Only grows (the state's clock, in milliseconds).
    pub version: u64,
    pub generated_s: u64,
    /// Per CA public key blob: the revoked certificate serials, sorted, unique, non-zero.
    pub certificates: Vec<(Vec<u8>, Vec<u64>)>,
    /// Revoked keys (public key blobs): a revoked CA key revokes everything it signed.
    pub revoked_keys: Vec<Vec<u8>>,
}

impl Krl {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&self.generated_s.to_be_bytes());
        out.extend_from_slice(&0u64.to_be_bytes());
        put_string(&mut out, b"");
        put_string(&mut out, COMMENT.as_bytes());
        for (ca, serials) in &self.certificates {
            if serials.is_empty() {
                continue;
            }
            let mut list = Vec::with_capacity(serials.len() * 8);
            for s in serials {
                list.extend_from_slice(&s.to_be_bytes());
            }
            let mut section = Vec::new();
            put_string(&mut section, ca);
            put_string(&mut section, b"");
            section.push(CERT_SERIAL_LIST);
            put_string(&mut section, &list);
            out.push(SECTION_CERTIFICATES);
            put_string(&mut out, &section);
        }
        if !self.revoked_keys.is_empty() {
            let mut section = Vec::new();
            for key in &self.revoked_keys {
                put_string(&mut section, key);
            }
            out.push(SECTION_EXPLICIT_KEY);
            put_string(&mut out, &section);
        }
        out
    }

    /// Reads back what [`Krl::encode`] writes (the subset of the format we produce); for tests
    /// and for clients that want to inspect a KRL without `ssh-keygen`.
    pub fn decode(bytes: &[u8]) -> Result<Krl, String> {
        let mut r = Reader(bytes);
        if r.take(8)? != MAGIC {
            return Err("not a KRL (bad magic)".into());
        }
        let format = r.u32()?;
        if format != FORMAT_VERSION {
            return Err(format!("KRL format version {format} is not 1"));
        }
        let mut krl = Krl {
            version: r.u64()?,
            generated_s: r.u64()?,
            ..Default::default()
        };
        let _flags = r.u64()?;
        let _reserved = r.string()?;
        let _comment = r.string()?;
        while !r.0.is_empty() {
            let kind = r.byte()?;
            let mut section = Reader(r.string()?);
            match kind {
                SECTION_CERTIFICATES => {
                    let ca = section.string()?.to_vec();
                    let _reserved = section.string()?;
                    let mut serials = Vec::new();
                    while !section.0.is_empty() {
                        let sub = section.byte()?;
                        let mut data = Reader(section.string()?);
                        if sub != CERT_SERIAL_LIST {
                            return Err(format!("unsupported certificate subsection {sub:#x}"));
                        }
                        while !data.0.is_empty() {
                            serials.push(data.u64()?);
                        }
                    }
                    krl.certificates.push((ca, serials));
                }
                SECTION_EXPLICIT_KEY => {
                    while !section.0.is_empty() {
                        krl.revoked_keys.push(section.string()?.to_vec());
                    }
                }
                other => return Err(format!("unsupported KRL section {other}")),
            }
        }
        Ok(krl)
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("KRL truncated".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn byte(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_be_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn string(&mut self) -> Result<&'a [u8], String> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}
