//! NBD URIs (`reference/nbd/uri.md`): how a pool names its storage devices.
//!
//! Why our own parser instead of a generic URL crate: NBD URIs have rules a
//! generic parser does not know (the path minus one `/` *is* the export name,
//! `nbd+unix` needs `?socket=` and no host, unknown query parameters must be
//! diagnosed, a socket may be in the abstract namespace), and a device URI
//! ends up in pool metadata, so it must round-trip exactly through
//! [`Display`](fmt::Display) and [`FromStr`].

use std::ffi::OsString;
use std::fmt;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use percent_encoding::{percent_encode, AsciiSet, CONTROLS};

use crate::proto::limits::STRING_BYTES_MAX;

/// The IANA-assigned NBD port, used when a TCP URI names none.
pub const DEFAULT_PORT: u16 = 10809;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Transport {
    /// TCP: `host` is a name, an IPv4 address or an IPv6 address (without
    /// brackets); `port` is `None` when the URI named none (10809 applies).
    Tcp { host: String, port: Option<u16> },
    /// A unix domain socket; a path whose first byte is NUL is in the
    /// abstract namespace (`socket=%00name`).
    Unix { socket: PathBuf },
}

/// TLS-related query parameters (the spec's, and libnbd's
/// `tls-certificates`). An `nbds` URI makes the client negotiate TLS
/// (`crate::tls`); these say how.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct TlsParams {
    /// `x509` (the default; `anon` and `psk` are refused at connect time).
    pub tls_type: Option<String>,
    /// The name the server's certificate must carry (default: the URI's
    /// host; needed for unix sockets).
    pub tls_hostname: Option<String>,
    /// `0` skips checking the server's certificate (default 1).
    pub tls_verify_peer: Option<bool>,
    /// A directory holding `ca-cert.pem` (the CA that signed the server's
    /// certificate) and optionally `client-cert.pem`/`client-key.pem` (a
    /// client certificate), as `nbdkit --tls-certificates` and libnbd use.
    pub tls_certificates: Option<PathBuf>,
}

/// A parsed NBD URI.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NbdUri {
    /// `nbds` / `nbds+unix`: TLS is required and the connection must fail
    /// without it.
    pub tls_required: bool,
    /// Optional `userinfo` from the authority (TLS user name).
    pub user: Option<String>,
    pub transport: Transport,
    /// Export name: the URI path without its leading `/`, percent-decoded.
    /// Empty means the server's default export.
    pub export: String,
    pub tls: TlsParams,
}

/// Why a string is not an NBD URI.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    #[error("{uri:?} is not an NBD URI: it must start with nbd://, nbds://, nbd+unix:// or nbds+unix://")]
    BadScheme { uri: String },
    #[error("NBD URI {uri:?}: {reason}")]
    Invalid { uri: String, reason: String },
    #[error(
        "NBD URI {uri:?}: unknown query parameter {name:?} (known: socket, tls-type, tls-hostname, tls-verify-peer, tls-certificates)"
    )]
    UnknownParameter { uri: String, name: String },
    #[error("NBD URI {uri:?}: a unix-socket URI needs a ?socket=PATH parameter")]
    MissingSocket { uri: String },
    #[error("NBD URI {uri:?}: a TCP URI needs a host, e.g. nbd://127.0.0.1:10809/export")]
    MissingHost { uri: String },
}

impl NbdUri {
    /// `nbd://host:port/export`.
    pub fn tcp(host: impl Into<String>, port: u16, export: impl Into<String>) -> NbdUri {
        NbdUri {
            tls_required: false,
            user: None,
            transport: Transport::Tcp { host: host.into(), port: Some(port) },
            export: export.into(),
            tls: TlsParams::default(),
        }
    }

    /// `nbd+unix:///export?socket=PATH`.
    pub fn unix(socket: impl AsRef<Path>, export: impl Into<String>) -> NbdUri {
        NbdUri {
            tls_required: false,
            user: None,
            transport: Transport::Unix { socket: socket.as_ref().to_path_buf() },
            export: export.into(),
            tls: TlsParams::default(),
        }
    }

    /// The scheme this URI is written with.
    pub fn scheme(&self) -> &'static str {
        match (&self.transport, self.tls_required) {
            (Transport::Tcp { .. }, false) => "nbd",
            (Transport::Tcp { .. }, true) => "nbds",
            (Transport::Unix { .. }, false) => "nbd+unix",
            (Transport::Unix { .. }, true) => "nbds+unix",
        }
    }

    /// The TCP port to connect to (default 10809), if this is a TCP URI.
    pub fn port(&self) -> Option<u16> {
        match &self.transport {
            Transport::Tcp { port, .. } => Some(port.unwrap_or(DEFAULT_PORT)),
            Transport::Unix { .. } => None,
        }
    }

    /// The same server with another export name.
    pub fn with_export(&self, export: impl Into<String>) -> NbdUri {
        NbdUri { export: export.into(), ..self.clone() }
    }
}

fn invalid(uri: &str, reason: impl Into<String>) -> UriError {
    UriError::Invalid { uri: uri.to_string(), reason: reason.into() }
}

/// Characters RFC 3986 never allows unescaped anywhere in a URI.
fn is_forbidden_char(c: char) -> bool {
    c.is_ascii_control() || matches!(c, ' ' | '"' | '<' | '>' | '\\' | '^' | '`' | '{' | '|' | '}') || !c.is_ascii()
}

/// Percent-decodes `s`, rejecting malformed escapes (`%zz`, `%4`).
fn decode(uri: &str, what: &str, s: &str) -> Result<Vec<u8>, UriError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                Some(v) if hex.is_some_and(|h| h.bytes().all(|c| c.is_ascii_hexdigit())) => out.push(v),
                _ => return Err(invalid(uri, format!("malformed percent-escape in the {what}"))),
            }
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

fn decode_utf8(uri: &str, what: &str, s: &str) -> Result<String, UriError> {
    String::from_utf8(decode(uri, what, s)?).map_err(|_| invalid(uri, format!("the {what} is not valid UTF-8")))
}

impl FromStr for NbdUri {
    type Err = UriError;

    fn from_str(uri: &str) -> Result<NbdUri, UriError> {
        let (scheme, rest) = uri.split_once("://").ok_or_else(|| UriError::BadScheme { uri: uri.to_string() })?;
        let (unix, tls_required) = match scheme.to_ascii_lowercase().as_str() {
            "nbd" => (false, false),
            "nbds" => (false, true),
            "nbd+unix" => (true, false),
            "nbds+unix" => (true, true),
            _ => return Err(UriError::BadScheme { uri: uri.to_string() }),
        };
        if let Some(c) = rest.chars().find(|&c| is_forbidden_char(c)) {
            return Err(invalid(uri, format!("character {c:?} must be percent-encoded")));
        }
        if rest.contains('#') {
            return Err(invalid(uri, "NBD URIs take no #fragment"));
        }
        let (before_query, query) = match rest.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match before_query.find('/') {
            Some(i) => (&before_query[..i], &before_query[i..]),
            None => (before_query, ""),
        };

        // Authority: [userinfo@]host[:port]
        let (user, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(decode_utf8(uri, "user name", u)?), h),
            None => (None, authority),
        };
        let (host, port) = if let Some(after_bracket) = hostport.strip_prefix('[') {
            let (h, tail) =
                after_bracket.split_once(']').ok_or_else(|| invalid(uri, "IPv6 address is missing its closing ']'"))?;
            if h.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(invalid(uri, format!("{h:?} is not an IPv6 address")));
            }
            let port = match tail {
                "" => None,
                t => Some(t.strip_prefix(':').ok_or_else(|| invalid(uri, "unexpected text after ']'"))?),
            };
            (h.to_string(), port)
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (decode_utf8(uri, "host", h)?, Some(p)),
                None => (decode_utf8(uri, "host", hostport)?, None),
            }
        };
        let port = match port {
            None | Some("") => None,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 && p.bytes().all(|c| c.is_ascii_digit()) => Some(n),
                _ => return Err(invalid(uri, format!("port {p:?} is not a number in 1..=65535"))),
            },
        };

        // Export name: the path without its leading '/'.
        let export = decode_utf8(uri, "export name", path.strip_prefix('/').unwrap_or(path))?;
        if export.contains('\0') {
            return Err(invalid(uri, "export names cannot contain NUL"));
        }
        if export.len() > STRING_BYTES_MAX {
            return Err(invalid(uri, format!("export name is longer than {STRING_BYTES_MAX} bytes")));
        }

        let mut socket = None;
        let mut tls = TlsParams::default();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let name = decode_utf8(uri, "query", k)?;
            let seen = match name.as_str() {
                "socket" => socket.replace(OsString::from_vec(decode(uri, "socket parameter", v)?)).is_some(),
                "tls-type" => tls.tls_type.replace(decode_utf8(uri, "tls-type", v)?).is_some(),
                "tls-hostname" => tls.tls_hostname.replace(decode_utf8(uri, "tls-hostname", v)?).is_some(),
                "tls-certificates" => tls
                    .tls_certificates
                    .replace(PathBuf::from(OsString::from_vec(decode(uri, "tls-certificates", v)?)))
                    .is_some(),
                "tls-verify-peer" => {
                    let b = match v {
                        "1" | "true" => true,
                        "0" | "false" => false,
                        _ => return Err(invalid(uri, format!("tls-verify-peer must be 0 or 1, not {v:?}"))),
                    };
                    tls.tls_verify_peer.replace(b).is_some()
                }
                _ => return Err(UriError::UnknownParameter { uri: uri.to_string(), name }),
            };
            if seen {
                return Err(invalid(uri, format!("query parameter {name:?} is given twice")));
            }
        }

        let transport = if unix {
            if !host.is_empty() || port.is_some() {
                return Err(invalid(
                    uri,
                    "a unix-socket URI takes no host or port (write nbd+unix:///export?socket=PATH)",
                ));
            }
            match socket {
                Some(s) if !s.is_empty() => Transport::Unix { socket: PathBuf::from(s) },
                _ => return Err(UriError::MissingSocket { uri: uri.to_string() }),
            }
        } else {
            if socket.is_some() {
                return Err(invalid(uri, "the socket parameter is only for nbd+unix:// URIs"));
            }
            if host.is_empty() {
                return Err(UriError::MissingHost { uri: uri.to_string() });
            }
            Transport::Tcp { host, port }
        };
        Ok(NbdUri { tls_required, user, transport, export, tls })
    }
}

/// Escapes for the path (export name): everything but unreserved,
/// sub-delims, ':', '@' and '/'.
const PATH_ESCAPES: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'[')
    .add(b'\\')
    .add(b']')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');
/// Query values additionally escape the separators and '+' (which many
/// decoders read as a space).
const QUERY_ESCAPES: &AsciiSet = &PATH_ESCAPES.add(b'&').add(b'=').add(b'+');
/// The user name additionally escapes ':' and '@' and '/'.
const USER_ESCAPES: &AsciiSet = &QUERY_ESCAPES.add(b':').add(b'@').add(b'/');

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://", self.scheme())?;
        if let Some(user) = &self.user {
            write!(f, "{}@", percent_encode(user.as_bytes(), USER_ESCAPES))?;
        }
        if let Transport::Tcp { host, port } = &self.transport {
            if host.contains(':') {
                write!(f, "[{host}]")?;
            } else {
                write!(f, "{}", percent_encode(host.as_bytes(), USER_ESCAPES))?;
            }
            if let Some(port) = port {
                write!(f, ":{port}")?;
            }
        }
        write!(f, "/{}", percent_encode(self.export.as_bytes(), PATH_ESCAPES))?;
        let mut sep = '?';
        if let Transport::Unix { socket } = &self.transport {
            write!(f, "{sep}socket={}", percent_encode(socket.as_os_str().as_bytes(), QUERY_ESCAPES))?;
            sep = '&';
        }
        if let Some(t) = &self.tls.tls_type {
            write!(f, "{sep}tls-type={}", percent_encode(t.as_bytes(), QUERY_ESCAPES))?;
            sep = '&';
        }
        if let Some(h) = &self.tls.tls_hostname {
            write!(f, "{sep}tls-hostname={}", percent_encode(h.as_bytes(), QUERY_ESCAPES))?;
            sep = '&';
        }
        if let Some(v) = self.tls.tls_verify_peer {
            write!(f, "{sep}tls-verify-peer={}", v as u8)?;
            sep = '&';
        }
        if let Some(dir) = &self.tls.tls_certificates {
            write!(f, "{sep}tls-certificates={}", percent_encode(dir.as_os_str().as_bytes(), QUERY_ESCAPES))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> NbdUri {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    /// The export-name table of uri.md, verbatim.
    #[test]
    fn export_names_from_the_spec() {
        for (uri, export) in [
            ("nbd://example.com/disk", "disk"),
            ("nbd+unix:///disk?socket=sock", "disk"),
            ("nbd://example.com/", ""),
            ("nbd://example.com", ""),
            ("nbd://example.com//disk", "/disk"),
            ("nbd://example.com/hello%20world", "hello world"),
        ] {
            assert_eq!(parse(uri).export, export, "{uri}");
        }
    }

    #[test]
    fn tcp_hosts_and_ports() {
        let u = parse("nbd://example.com:10810/x");
        assert_eq!(u.transport, Transport::Tcp { host: "example.com".into(), port: Some(10810) });
        assert_eq!(u.port(), Some(10810));
        assert_eq!(parse("nbd://example.com/x").port(), Some(DEFAULT_PORT));
        let v6 = parse("nbd://[::1]:2000/e");
        assert_eq!(v6.transport, Transport::Tcp { host: "::1".into(), port: Some(2000) });
        assert_eq!(v6.to_string(), "nbd://[::1]:2000/e");
        assert_eq!(parse("nbd://[::1]/").port(), Some(DEFAULT_PORT));
        let user = parse("nbds://alice@host/e?tls-type=x509&tls-verify-peer=0");
        assert!(user.tls_required);
        assert_eq!(user.user.as_deref(), Some("alice"));
        assert_eq!(user.tls.tls_type.as_deref(), Some("x509"));
        assert_eq!(user.tls.tls_verify_peer, Some(false));
    }

    #[test]
    fn unix_sockets() {
        let u = parse("nbd+unix:///export?socket=/tmp/nbd.sock");
        assert_eq!(u.transport, Transport::Unix { socket: "/tmp/nbd.sock".into() });
        assert_eq!(u.export, "export");
        assert_eq!(u.port(), None);
        let abs = parse("nbd+unix:///?socket=%00/abstract");
        let Transport::Unix { socket } = &abs.transport else { panic!() };
        assert_eq!(socket.as_os_str().as_bytes(), b"\0/abstract");
        assert_eq!(abs.to_string(), "nbd+unix:///?socket=%00/abstract");
        assert!(parse("nbds+unix:///e?socket=s").tls_required);
    }

    #[test]
    fn canonical_strings_round_trip_exactly() {
        for s in [
            "nbd://example.com/disk",
            "nbd://example.com:10809/disk",
            "nbd://example.com/",
            "nbd://example.com//disk",
            "nbd://example.com/hello%20world",
            "nbd://[fe80::1]:1/a%3Fb%23c",
            "nbds://bob@h/e?tls-type=psk&tls-hostname=h2&tls-verify-peer=1",
            "nbds+unix:///e?socket=/s&tls-hostname=localhost&tls-certificates=/etc/sanvol/pki%20dir",
            "nbd+unix:///disk?socket=/run/a%20b.sock",
            "nbds+unix:///?socket=s",
        ] {
            assert_eq!(parse(s).to_string(), s);
        }
        // Non-canonical spellings still round-trip as values.
        for s in ["nbd://example.com", "nbd://h:/x", "NBD://h/%7e"] {
            let u = parse(s);
            assert_eq!(parse(&u.to_string()), u, "{s}");
        }
    }

    #[test]
    fn constructed_uris_round_trip() {
        let weird = "ä b?c#d%e&f=g+h/i";
        for u in
            [NbdUri::tcp("10.0.0.1", 7000, weird), NbdUri::unix("/tmp/s o&c=k+t", weird), NbdUri::tcp("::1", 1, "")]
        {
            assert_eq!(parse(&u.to_string()), u, "{u}");
        }
    }

    #[test]
    fn bad_uris_are_diagnosed() {
        let err = |s: &str| s.parse::<NbdUri>().expect_err(s);
        assert!(matches!(err("http://example.com/x"), UriError::BadScheme { .. }));
        assert!(matches!(err("example.com/x"), UriError::BadScheme { .. }));
        assert!(matches!(err("nbd+unix:///x"), UriError::MissingSocket { .. }));
        assert!(matches!(err("nbd:///x"), UriError::MissingHost { .. }));
        assert!(matches!(err("nbd://h/x?frobnicate=1"), UriError::UnknownParameter { .. }));
        for bad in [
            "nbd://h:99999/x",
            "nbd://h:12a/x",
            "nbd://[::1/x",
            "nbd://[zz]/x",
            "nbd://h/a%zz",
            "nbd://h/a%4",
            "nbd://h/a%00b",
            "nbd://h/a%ff",
            "nbd://h/a b",
            "nbd://h/x#frag",
            "nbd://h/x?socket=/s",
            "nbd+unix://host/x?socket=/s",
            "nbd+unix:///x?socket=a&socket=b",
            "nbds://h/x?tls-verify-peer=maybe",
        ] {
            let e = err(bad);
            assert!(matches!(e, UriError::Invalid { .. }), "{bad}: {e}");
            assert!(e.to_string().contains(bad), "error names the URI: {e}");
        }
    }
}
