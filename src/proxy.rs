//! Running behind a reverse proxy: the base path everything is served under
//! (`base_path`), and the proxies believed when they say who the client is
//! (`trusted_proxies`, for `X-Forwarded-For`). The forwarded host and scheme decide
//! nothing: which pages are the server's own is configured (`public_origins`, see
//! `cors`), since a `Host` header is whatever the browser was pointed at.
//!
//! Forwarded headers are read only when the TCP peer is inside one of the trusted
//! blocks: from anyone else they are whatever the client chose to write, and must never
//! decide an origin check or name a client in a log.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use axum::http::{HeaderMap, HeaderName, HeaderValue};

/// Checks a base path and writes it the one way the router uses: empty for the root,
/// else `/a/b` — a leading slash, no trailing one (`/dolores/` becomes `/dolores`).
/// Only letters, digits and `-._~` between slashes: the prefix is matched against the
/// request path as sent, so it must be something no client percent-encodes, and
/// nothing the router reads as a pattern (`{`, `*`).
pub fn parse_base_path(raw: &str) -> Result<String, String> {
    let path = raw.trim_end_matches('/');
    if path.is_empty() {
        return if raw.is_empty() || raw.starts_with('/') {
            Ok(String::new())
        } else {
            Err(format!(
                "base_path {raw:?} must start with / (like /dolores)"
            ))
        };
    }
    if !path.starts_with('/') {
        return Err(format!(
            "base_path {raw:?} must start with / (like /dolores)"
        ));
    }
    if let Some(c) = path
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-._~/".contains(*c)))
    {
        return Err(format!(
            "base_path {raw:?} holds {c:?}: only letters, digits and - . _ ~ may stand between \
             its slashes (no ?, #, spaces or %)"
        ));
    }
    if path[1..]
        .split('/')
        .any(|segment| segment.is_empty() || segment == "." || segment == "..")
    {
        return Err(format!(
            "base_path {raw:?} has an empty, . or .. segment; write it like /dolores or /apps/push"
        ));
    }
    Ok(path.to_owned())
}

/// The rest of `path` after `base` (with its leading `/`), when `path` is under `base`.
/// An empty `base` is the root: every path is under it.
pub fn strip_base<'a>(base: &str, path: &'a str) -> Option<&'a str> {
    let rest = path.strip_prefix(base)?;
    rest.starts_with('/').then_some(rest)
}

/// A block of addresses, like `10.0.0.0/8` or `::1/128`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `addr` is inside the block (an IPv4 address written as IPv6, like
    /// `::ffff:10.0.0.1` from a dual-stack socket, counts as the IPv4 address).
    pub fn contains(&self, addr: IpAddr) -> bool {
        let addr = addr.to_canonical();
        addr.is_ipv4() == self.network.is_ipv4() && masked(addr, self.prefix) == self.network
    }
}

/// `addr` with every bit after the first `prefix` cleared.
fn masked(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    /// `10.0.0.0/8`, `::1/128`, or a bare address (a block of one).
    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| {
            format!("{text:?} is not an address or a block like 10.0.0.0/8 or ::1/128")
        })?;
        let bits = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= bits)
                .ok_or_else(|| format!("{text:?}: the prefix length must be 0 to {bits}"))?,
        };
        let network = masked(addr, prefix);
        if network != addr {
            // Most likely a typo for the block, or an address meant as /32: say which.
            return Err(format!(
                "{text:?} has address bits after the first {prefix}: write {network}/{prefix} \
                 for the block, or {addr} alone for the one address"
            ));
        }
        Ok(Self { network, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// The proxies whose `X-Forwarded-*` headers are believed. Empty: none are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<Cidr>);

impl TrustedProxies {
    /// Parses a list of blocks (`127.0.0.1/32`, `::1/128`, `10.0.0.0/8`); empty entries
    /// are skipped, so an empty `DOLORES_TRUSTED_PROXIES` means none.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, String> {
        entries
            .iter()
            .map(|e| e.as_ref().trim())
            .filter(|e| !e.is_empty())
            .map(|e| e.parse().map_err(|m| format!("trusted_proxies: {m}")))
            .collect::<Result<Vec<Cidr>, String>>()
            .map(Self)
    }

    /// Whether no proxy is trusted.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `addr` is a trusted proxy.
    pub fn contains(&self, addr: IpAddr) -> bool {
        self.0.iter().any(|block| block.contains(addr))
    }

    /// Who sent a request that came from `peer` (the TCP peer, when known) with
    /// `headers`: the peer itself, or, from a trusted proxy, the right-most
    /// `X-Forwarded-For` address that is not itself a trusted proxy.
    pub fn client(&self, peer: Option<SocketAddr>, headers: &HeaderMap) -> Client {
        let addr = peer.map(|p| p.ip().to_canonical()).map(|peer| {
            if self.contains(peer) {
                self.forwarded_for(peer, headers)
            } else {
                peer
            }
        });
        Client { addr }
    }

    /// Walks `X-Forwarded-For` from the right while the hop that added the entry is
    /// trusted: every trusted proxy appends the address it got the request from, so
    /// the first untrusted one is the client (anything left of it is the client's own
    /// word). An entry that is not an address stops the walk at the hop that sent it.
    fn forwarded_for(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let mut client = peer;
        let values: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        let entries = values
            .iter()
            .rev()
            .flat_map(|v| v.rsplit(','))
            .map(str::trim)
            .filter(|e| !e.is_empty());
        for entry in entries {
            if !self.contains(client) {
                break;
            }
            match forwarded_addr(entry) {
                Some(addr) => client = addr,
                None => break,
            }
        }
        client
    }
}

/// An `X-Forwarded-For` entry: an address, maybe with a port (`[::1]:80`, `1.2.3.4:80`).
fn forwarded_addr(entry: &str) -> Option<IpAddr> {
    let addr = entry
        .parse::<IpAddr>()
        .or_else(|_| entry.parse::<SocketAddr>().map(|s| s.ip()))
        .or_else(|_| {
            entry
                .strip_prefix('[')
                .and_then(|e| e.strip_suffix(']'))
                .unwrap_or("")
                .parse::<IpAddr>()
        })
        .ok()?;
    Some(addr.to_canonical())
}

/// Who a request comes from, as far as the server can tell (see
/// [`TrustedProxies::client`]). Shown in logs as the address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Client {
    /// The client's address, when the connection's peer is known.
    pub addr: Option<IpAddr>,
}

impl fmt::Display for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            Some(addr) => write!(f, "{addr}"),
            None => f.write_str("an unknown client"),
        }
    }
}

/// The headers of a head read with `httparse`, as the map the rest of the server reads,
/// for the requests served on the socket without hyper (streams, publishes). A header
/// hyper would refuse (a name or value that is not valid) is left out, as hyper leaves
/// the request out.
pub(crate) fn header_map(headers: &[httparse::Header<'_>]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for header in headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(header.name.as_bytes()),
            HeaderValue::from_bytes(header.value),
        ) {
            map.append(name, value);
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    fn peer(addr: &str) -> Option<SocketAddr> {
        Some(SocketAddr::new(addr.parse().expect("address"), 40000))
    }

    fn trusted(blocks: &[&str]) -> TrustedProxies {
        TrustedProxies::parse(blocks).expect("valid blocks")
    }

    #[test]
    fn base_paths_are_normalised() {
        assert_eq!(parse_base_path(""), Ok(String::new()));
        assert_eq!(parse_base_path("/"), Ok(String::new()));
        assert_eq!(parse_base_path("/dolores"), Ok("/dolores".into()));
        assert_eq!(parse_base_path("/dolores/"), Ok("/dolores".into()));
        assert_eq!(
            parse_base_path("/apps/push-1.v2~x"),
            Ok("/apps/push-1.v2~x".into())
        );
    }

    #[test]
    fn bad_base_paths_say_why() {
        for (raw, says) in [
            ("dolores", "must start with /"),
            ("/dol ores", "' '"),
            ("/dolores?x=1", "'?'"),
            ("/dolores#top", "'#'"),
            ("/dol%20", "'%'"),
            ("/{uid}", "'{'"),
            ("/a//b", "empty"),
            ("/a/../b", ".."),
        ] {
            let error = parse_base_path(raw).expect_err(raw);
            assert!(error.contains(says), "{raw}: {error}");
        }
    }

    #[test]
    fn paths_are_stripped_only_under_the_base() {
        assert_eq!(strip_base("", "/listen/x"), Some("/listen/x"));
        assert_eq!(
            strip_base("/dolores", "/dolores/listen/x"),
            Some("/listen/x")
        );
        assert_eq!(strip_base("/dolores", "/listen/x"), None);
        assert_eq!(strip_base("/dolores", "/doloresX/listen/x"), None);
        assert_eq!(strip_base("/dolores", "/dolores"), None);
    }

    #[test]
    fn cidrs_parse_and_contain() {
        let block: Cidr = "10.0.0.0/8".parse().expect("valid");
        assert!(block.contains("10.200.3.4".parse().expect("ip")));
        assert!(block.contains("::ffff:10.1.2.3".parse().expect("ip")));
        assert!(!block.contains("11.0.0.1".parse().expect("ip")));
        assert!(!block.contains("::1".parse().expect("ip")));
        let one: Cidr = "::1/128".parse().expect("valid");
        assert!(one.contains("::1".parse().expect("ip")));
        assert!(!one.contains("::2".parse().expect("ip")));
        let bare: Cidr = "192.168.1.7".parse().expect("valid");
        assert_eq!(bare.to_string(), "192.168.1.7/32");
        let all: Cidr = "0.0.0.0/0".parse().expect("valid");
        assert!(all.contains("203.0.113.9".parse().expect("ip")));
        let v6: Cidr = "fd00::/8".parse().expect("valid");
        assert!(v6.contains("fd12:3456::1".parse().expect("ip")));
    }

    #[test]
    fn bad_cidrs_say_why() {
        for (text, says) in [
            ("10.0.0.1/8", "write 10.0.0.0/8"),
            ("10.0.0.0/33", "0 to 32"),
            ("::1/129", "0 to 128"),
            ("10.0.0.0/x", "prefix length"),
            ("localhost", "not an address"),
            ("10.0.0/8", "not an address"),
        ] {
            let error = text.parse::<Cidr>().expect_err(text);
            assert!(error.contains(says), "{text}: {error}");
        }
        let error = TrustedProxies::parse(&["127.0.0.1/32", "nope"]).expect_err("bad entry");
        assert!(error.starts_with("trusted_proxies: "), "{error}");
        assert!(TrustedProxies::parse(&[""]).expect("empty").is_empty());
    }

    #[test]
    fn forwarded_headers_count_only_from_a_trusted_peer() {
        let forwarded = headers(&[("x-forwarded-for", "198.51.100.7")]);
        let proxies = trusted(&["127.0.0.1/32"]);
        let via_proxy = proxies.client(peer("127.0.0.1"), &forwarded);
        assert_eq!(via_proxy.addr, Some("198.51.100.7".parse().expect("ip")));
        let direct = proxies.client(peer("127.0.0.2"), &forwarded);
        assert_eq!(direct.addr, Some("127.0.0.2".parse().expect("ip")));
        let nobody = TrustedProxies::default().client(peer("127.0.0.1"), &forwarded);
        assert_eq!(nobody.addr, Some("127.0.0.1".parse().expect("ip")));
    }

    #[test]
    fn the_client_is_the_rightmost_untrusted_hop() {
        let proxies = trusted(&["10.0.0.0/8", "127.0.0.1"]);
        // The client wrote 6.6.6.6 itself; 203.0.113.5 reached the outer proxy 10.0.0.2.
        let chain = headers(&[
            ("x-forwarded-for", "6.6.6.6, 203.0.113.5"),
            ("x-forwarded-for", "10.0.0.2"),
        ]);
        let client = proxies.client(peer("127.0.0.1"), &chain);
        assert_eq!(client.addr, Some("203.0.113.5".parse().expect("ip")));
        // Every hop trusted: the left-most is all there is.
        let inside = headers(&[("x-forwarded-for", "10.1.1.1, 10.0.0.2")]);
        let client = proxies.client(peer("127.0.0.1"), &inside);
        assert_eq!(client.addr, Some("10.1.1.1".parse().expect("ip")));
        // Garbage stops the walk at the hop that sent it.
        let garbage = headers(&[("x-forwarded-for", "203.0.113.5, unknown, 10.0.0.2")]);
        let client = proxies.client(peer("127.0.0.1"), &garbage);
        assert_eq!(client.addr, Some("10.0.0.2".parse().expect("ip")));
        // Ports and brackets are allowed.
        let ported = headers(&[("x-forwarded-for", "[2001:db8::1]:4711")]);
        let client = proxies.client(peer("127.0.0.1"), &ported);
        assert_eq!(client.addr, Some("2001:db8::1".parse().expect("ip")));
        // No header: the proxy itself.
        let client = proxies.client(peer("127.0.0.1"), &HeaderMap::new());
        assert_eq!(client.addr, Some("127.0.0.1".parse().expect("ip")));
    }
}
