//! A server on this machine: where it listens and where it keeps its generated api key
//! by default, so the client commands and the bench find it without being told.

use std::fmt;
use std::path::{Path, PathBuf};

/// Where the server listens by default: loopback, on the port the original used.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8007";
/// Where the embedded store and the generated api key live by default.
pub const DEFAULT_DATA: &str = "./dolores-data";
/// The file in the data dir that holds a generated api key.
pub const API_KEY_FILE: &str = "api-key";

/// No api key was given and the key file has none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoApiKey {
    /// The key file that was looked in.
    pub key_file: PathBuf,
}

impl fmt::Display for NoApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "no api key: pass --api-key or set DOLORES_API_KEY (a local server keeps its \
             generated key in {})",
            self.key_file.display()
        )
    }
}

impl std::error::Error for NoApiKey {}

/// The api key given, else the one a local server generated into `key_file`.
pub fn api_key_or_file(given: Option<&str>, key_file: &Path) -> Result<String, NoApiKey> {
    if let Some(key) = given {
        return Ok(key.to_owned());
    }
    match std::fs::read_to_string(key_file) {
        Ok(key) if !key.trim().is_empty() => Ok(key.trim().to_owned()),
        _ => Err(NoApiKey {
            key_file: key_file.to_owned(),
        }),
    }
}
