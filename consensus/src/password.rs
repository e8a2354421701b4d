//! The `tidepool` role's password: generated once, kept in `DIR/password` (mode 600).

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::error::{Error, Result};

const LENGTH: usize = 24;
/// Letters and digits only: the password goes into a URL and a SQL literal unescaped-safe.
const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// A new random password, from the kernel's CSPRNG.
pub fn generate() -> Result<String> {
    let mut urandom =
        std::fs::File::open("/dev/urandom").map_err(Error::io("opening /dev/urandom"))?;
    let mut out = String::with_capacity(LENGTH);
    let mut buf = [0u8; 64];
    while out.len() < LENGTH {
        urandom
            .read_exact(&mut buf)
            .map_err(Error::io("reading /dev/urandom"))?;
        // Rejection sampling keeps every character equally likely: 248 = 4 * 62.
        for &b in &buf {
            if (b as usize) < 4 * ALPHABET.len() && out.len() < LENGTH {
                out.push(ALPHABET[b as usize % ALPHABET.len()] as char);
            }
        }
    }
    Ok(out)
}

/// The stored password, or `None` when the file does not exist.
pub fn read(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s.trim().to_string()).filter(|s| !s.is_empty())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Io {
            context: format!("reading {}", path.display()),
            source: e,
        }),
    }
}

/// Writes the password, readable by the owner only (the mode is set at creation, so the
/// password is never readable by others, even for a moment).
pub fn write(path: &Path, password: &str) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(Error::io(format!("writing {}", path.display())))?;
    // A file left from before may have another mode: `mode` above only applies at creation.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(Error::io(format!("chmod 600 {}", path.display())))?;
    f.write_all(format!("{password}\n").as_bytes())
        .map_err(Error::io(format!("writing {}", path.display())))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_passwords_are_long_alphanumeric_and_differ() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        assert_eq!(a.len(), LENGTH);
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, b);
    }
}
