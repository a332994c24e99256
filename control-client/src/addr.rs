//! Where a metadata server listens: `HOST:PORT` for TCP, `unix:PATH` for a
//! unix socket.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use tokio::io::{AsyncRead, AsyncWrite};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlAddr {
    Tcp(String),
    Unix(PathBuf),
}

impl FromStr for ControlAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<ControlAddr, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: address needs a socket path, e.g. unix:/run/sanvol/mds.sock".into());
            }
            return Ok(ControlAddr::Unix(PathBuf::from(path)));
        }
        if s.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok()) {
            return Ok(ControlAddr::Tcp(s.to_string()));
        }
        Err(format!("{s:?} is not a metadata-server address: use HOST:PORT (e.g. 127.0.0.1:7700) or unix:PATH"))
    }
}

impl fmt::Display for ControlAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ControlAddr::Tcp(a) => f.write_str(a),
            ControlAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A connected control stream of either kind.
pub trait ControlStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> ControlStream for T {}

impl ControlAddr {
    pub async fn connect(&self) -> std::io::Result<Box<dyn ControlStream>> {
        Ok(match self {
            ControlAddr::Tcp(a) => {
                let s = tokio::net::TcpStream::connect(a).await?;
                s.set_nodelay(true)?;
                Box::new(s)
            }
            ControlAddr::Unix(p) => Box::new(tokio::net::UnixStream::connect(p).await?),
        })
    }
}
