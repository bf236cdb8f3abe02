//! Just enough of the ZIP format to take one member out of a Python wheel: the central
//! directory, and stored or deflated members, streamed with their CRC-32 checked.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};

const EOCD_SIG: u32 = 0x0605_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const LOCAL_SIG: u32 = 0x0403_4b50;
const EOCD_MIN: u64 = 22;
/// The end-of-central-directory record is followed by a comment of at most 64 KiB.
const EOCD_SEARCH: u64 = EOCD_MIN + 0xffff;

#[derive(Debug, thiserror::Error)]
pub enum ZipError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("not a zip archive (no end of central directory record)")]
    NoDirectory,
    #[error("zip archive is corrupt: {0}")]
    Corrupt(&'static str),
    #[error("zip member {0:?} not found")]
    MissingMember(String),
    #[error(
        "zip member {name:?} uses compression method {method} (only stored and deflate are supported)"
    )]
    Unsupported { name: String, method: u16 },
    #[error("zip member {name:?} is {size} bytes, more than the {limit} allowed")]
    TooLarge { name: String, size: u64, limit: u64 },
    #[error("zip member {name:?} has CRC-32 {actual:08x}, the archive says {expected:08x}")]
    Crc {
        name: String,
        expected: u32,
        actual: u32,
    },
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, ZipError> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or(ZipError::Corrupt("record cut short"))
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, ZipError> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(ZipError::Corrupt("record cut short"))
}

/// Where a member's compressed bytes are and how to expand them.
#[derive(Debug)]
pub struct Member {
    pub name: String,
    method: u16,
    crc: u32,
    compressed: u64,
    pub size: u64,
    local_header: u64,
}

/// Finds `name` in the archive's central directory.
pub fn find_member(file: &mut File, name: &str) -> Result<Member, ZipError> {
    let len = file.metadata()?.len();
    if len < EOCD_MIN {
        return Err(ZipError::NoDirectory);
    }
    let tail_len = len.min(EOCD_SEARCH);
    file.seek(SeekFrom::Start(len - tail_len))?;
    let mut tail = vec![0u8; tail_len as usize];
    file.read_exact(&mut tail)?;
    let eocd = (0..=tail.len() - EOCD_MIN as usize)
        .rev()
        .find(|&i| u32_at(&tail, i).ok() == Some(EOCD_SIG))
        .ok_or(ZipError::NoDirectory)?;
    let dir_size = u64::from(u32_at(&tail, eocd + 12)?);
    let dir_offset = u64::from(u32_at(&tail, eocd + 16)?);
    if dir_offset == u64::from(u32::MAX) || dir_size == u64::from(u32::MAX) {
        return Err(ZipError::Corrupt("zip64 archives are not supported"));
    }
    if dir_offset.checked_add(dir_size).is_none_or(|end| end > len) {
        return Err(ZipError::Corrupt("central directory lies outside the file"));
    }
    file.seek(SeekFrom::Start(dir_offset))?;
    let mut dir = vec![0u8; dir_size as usize]; // bounded by the file length above
    file.read_exact(&mut dir)?;

    let mut at = 0usize;
    while at + 46 <= dir.len() {
        if u32_at(&dir, at)? != CENTRAL_SIG {
            return Err(ZipError::Corrupt("bad central directory entry"));
        }
        let n = usize::from(u16_at(&dir, at + 28)?);
        let extra = usize::from(u16_at(&dir, at + 30)?);
        let comment = usize::from(u16_at(&dir, at + 32)?);
        let entry_name = dir
            .get(at + 46..at + 46 + n)
            .ok_or(ZipError::Corrupt("entry name cut short"))?;
        if entry_name == name.as_bytes() {
            return Ok(Member {
                name: name.to_owned(),
                method: u16_at(&dir, at + 10)?,
                crc: u32_at(&dir, at + 16)?,
                compressed: u64::from(u32_at(&dir, at + 20)?),
                size: u64::from(u32_at(&dir, at + 24)?),
                local_header: u64::from(u32_at(&dir, at + 42)?),
            });
        }
        at += 46 + n + extra + comment;
    }
    Err(ZipError::MissingMember(name.to_owned()))
}

/// Streams the member's expanded bytes into `out`, calling `progress(bytes_so_far)` as it
/// goes, and checks the CRC-32. Refuses members larger than `limit` bytes.
pub fn extract(
    file: &mut File,
    m: &Member,
    limit: u64,
    out: &mut impl Write,
    mut progress: impl FnMut(u64),
) -> Result<(), ZipError> {
    if m.size > limit {
        return Err(ZipError::TooLarge {
            name: m.name.clone(),
            size: m.size,
            limit,
        });
    }
    file.seek(SeekFrom::Start(m.local_header))?;
    let mut local = [0u8; 30];
    file.read_exact(&mut local)?;
    if u32_at(&local, 0)? != LOCAL_SIG {
        return Err(ZipError::Corrupt("bad local header"));
    }
    let skip = u64::from(u16_at(&local, 26)?) + u64::from(u16_at(&local, 28)?);
    file.seek(SeekFrom::Current(skip as i64))?;
    let raw = (&mut *file).take(m.compressed);
    let mut reader: Box<dyn Read + '_> = match m.method {
        0 => Box::new(raw),
        8 => Box::new(flate2::read::DeflateDecoder::new(raw)),
        method => {
            return Err(ZipError::Unsupported {
                name: m.name.clone(),
                method,
            });
        }
    };
    let mut crc = flate2::Crc::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        done += n as u64;
        if done > m.size {
            return Err(ZipError::Corrupt("member expands past its recorded size"));
        }
        crc.update(&buf[..n]);
        out.write_all(&buf[..n])?;
        progress(done);
    }
    if done != m.size {
        return Err(ZipError::Corrupt(
            "member is shorter than its recorded size",
        ));
    }
    if crc.sum() != m.crc {
        return Err(ZipError::Crc {
            name: m.name.clone(),
            expected: m.crc,
            actual: crc.sum(),
        });
    }
    Ok(())
}
